// Attention of a few query tokens (decode, speculative verify) against the static KV cache, on the CPU.
//
// Reads only the cache positions a query can see (0..its position), not the whole preallocated cache, and each key
// and value row once per KV head for all query heads sharing it (GQA) and all query tokens. Math in fp32: scores
// q.k / sqrt(D), a max-subtracted softmax, then the weighted sum of values. Each query's result depends only on its
// own position, never on how many queries share the call, so a verify step scores exactly as decode does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#define BITFAST_ATTN_AVX512 1
#include <immintrin.h>
#endif

namespace {

using bf16 = c10::BFloat16;

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i]);
}

#ifdef BITFAST_ATTN_AVX512
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

// Lane i of the result: the horizontal sum of v[i] (v is clobbered). Four rounds of shuffle-and-add halve the
// vectors, a fixed permute puts the lanes back in order: ~2 ops per sum where _mm512_reduce_add_ps takes ~8.
inline __m512 hsum16(__m512* v) {
  for (int i = 0; i < 8; ++i)  // 256-bit halves
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit blocks
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 4], 0x88), _mm512_shuffle_f32x4(v[i], v[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i) {  // 64-bit pairs
    const __m512d a = _mm512_castps_pd(v[i]), b = _mm512_castps_pd(v[i + 2]);
    v[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), s);
}

// Masked loads and stores only where a row or a chunk ends: on this CPU class they cost enough that masking every
// access made the whole attention measurably slower (head_dim 64, scratch microbenchmark). The full 16-lane steps come
// first, without a mask, then one masked tail.
inline void store16(float* p, int64_t left, __m512 v) {
  if (left >= 16) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, tail_mask(left), v);
}

// v[i] += q . k[i] over dims [d, d + 16) for 16 rows of k (row stride D); Load: full or masked 16-lane loads.
template <typename Load>
inline void dots_step(const float* q, const float* k, int64_t D, int64_t d, __m512* v, Load load) {
  const __m512 qv = load(q + d);
  for (int i = 0; i < 16; ++i) v[i] = _mm512_fmadd_ps(qv, load(k + i * D + d), v[i]);
}

// out[i] = scale * q . k[i] for the n <= 16 rows of k (row stride D).
inline void dots16(const float* q, const float* k, int64_t n, int64_t D, float scale, float* out) {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) dots_step(q, k, D, d, v, [](const float* p) { return _mm512_loadu_ps(p); });
  if (d < D) {
    const __mmask16 m = tail_mask(D - d);
    dots_step(q, k, D, d, v, [m](const float* p) { return _mm512_maskz_loadu_ps(m, p); });
  }
  store16(out, n, _mm512_mul_ps(hsum16(v), _mm512_set1_ps(scale)));
}

// acc[d, d + 16) += sum_i p[i] * v[i] over the n <= 16 rows of v (row stride D).
template <typename Load, typename Store>
inline void pv_step(const float* p, const float* v, int64_t n, int64_t D, int64_t d, float* acc, Load load,
                    Store store) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  // two chains: FMA latency
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[i]), load(v + i * D + d), a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(p[i + 1]), load(v + (i + 1) * D + d), a1);
  }
  if (i < n) a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[i]), load(v + i * D + d), a0);
  store(acc + d, _mm512_add_ps(load(acc + d), _mm512_add_ps(a0, a1)));
}

// acc += sum_i p[i] * v[i] over the n <= 16 rows of v (row stride D).
inline void pv16(const float* p, const float* v, int64_t n, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    pv_step(p, v, n, D, d, acc, [](const float* a) { return _mm512_loadu_ps(a); },
            [](float* a, __m512 x) { _mm512_storeu_ps(a, x); });
  }
  if (d < D) {
    const __mmask16 m = tail_mask(D - d);
    pv_step(p, v, n, D, d, acc, [m](const float* a) { return _mm512_maskz_loadu_ps(m, a); },
            [m](float* a, __m512 x) { _mm512_mask_storeu_ps(a, m, x); });
  }
}

// exp(x) for x <= 0 (max-subtracted scores): 2^n * e^r, |r| <= ln2 / 2, degree-6 polynomial (~1 ulp).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// p[t] = exp(p[t] - max) for t < L; returns the sum.
inline float softmax_numerators(float* p, int64_t L, float max) {
  const __m512 mv = _mm512_set1_ps(max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; t += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail_mask(L - t), p + t), mv));
    store16(p + t, L - t, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail_mask(L - t), e));
  }
  return _mm512_reduce_add_ps(sum);
}
#else
inline void dots16(const float* q, const float* k, int64_t n, int64_t D, float scale, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += q[d] * k[i * D + d];
    out[i] = acc * scale;
  }
}

inline void pv16(const float* p, const float* v, int64_t n, int64_t D, float* acc) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t d = 0; d < D; ++d) acc[d] += p[i] * v[i * D + d];
  }
}

inline float softmax_numerators(float* p, int64_t L, float max) {
  float sum = 0.f;
  for (int64_t t = 0; t < L; ++t) sum += (p[t] = std::exp(p[t] - max));
  return sum;
}
#endif

// One (batch row, KV head): its `rep` query heads x S query tokens = J queries.
// off[j]: where query j sits in q and in y (same layout).
template <typename T>
void kv_head(const T* q, const T* kc, const T* vc, const int64_t* len, const int64_t* off, int64_t J, int64_t D,
             float scale, T* y) {
  // Scratch kept across calls; raw pointers in the loops (a thread_local is looked up on every use in a .so).
  thread_local std::vector<float> qf_buf, row_buf, score_buf, acc_buf, inv_buf;
  int64_t L = 0;
  for (int64_t j = 0; j < J; ++j) L = std::max(L, len[j]);
  qf_buf.resize(J * D), row_buf.assign(16 * D, 0.f), score_buf.resize(J * L), acc_buf.assign(J * D, 0.f);
  inv_buf.resize(J);
  float *qf = qf_buf.data(), *row = row_buf.data(), *scores = score_buf.data(), *acc = acc_buf.data();
  float* inv_sum = inv_buf.data();
  for (int64_t j = 0; j < J; ++j) to_float(q + off[j], qf + j * D, D);
  for (int64_t t = 0; t < L; t += 16) {  // 16 key rows at a time for every query that sees them
    const int64_t n = std::min<int64_t>(16, L - t);
    to_float(kc + t * D, row, n * D);
    for (int64_t j = 0; j < J; ++j) {
      if (t < len[j]) dots16(qf + j * D, row, std::min(n, len[j] - t), D, scale, scores + j * L + t);
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    float* p = scores + j * L;
    inv_sum[j] = 1.f / softmax_numerators(p, len[j], *std::max_element(p, p + len[j]));
  }
  for (int64_t t = 0; t < L; t += 16) {  // 16 value rows at a time for every query that sees them
    const int64_t n = std::min<int64_t>(16, L - t);
    to_float(vc + t * D, row, n * D);
    for (int64_t j = 0; j < J; ++j) {
      if (t < len[j]) pv16(scores + j * L + t, row, std::min(n, len[j] - t), D, acc + j * D);
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    for (int64_t d = 0; d < D; ++d) y[off[j] + d] = T(acc[j * D + d] * inv_sum[j]);
  }
}

}  // namespace

// q [B, H, S, D]; k_cache, v_cache [B, KVH, T, D]; input_pos [S] or [B, S] -> [B, H, S, D] in the cache's dtype.
// Query (b, s) sees cache positions 0..input_pos[b, s], as the model's causal mask allows.
at::Tensor few_query_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& input_pos) {
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
              input_pos.device().is_cpu(), "few_query_attention: all tensors must be on the CPU");
  TORCH_CHECK(q_in.dim() == 4 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "few_query_attention: q must be [B, H, S, D] and the caches [B, KVH, T, D] alike, got ", q_in.sizes(),
              ", ", k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2), D = q_in.size(3);
  const int64_t KVH = k_cache.size(1), T_ = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D && KVH > 0 && H % KVH == 0,
              "few_query_attention: caches ", k_cache.sizes(), " do not fit q ", q_in.sizes());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && q_in.scalar_type() == k_cache.scalar_type() &&
              (q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16),
              "few_query_attention: q and caches must share a dtype, float32 or bfloat16");
  TORCH_CHECK(input_pos.scalar_type() == at::kLong && (input_pos.dim() == 1 || input_pos.dim() == 2) &&
              input_pos.size(-1) == S && (input_pos.dim() == 1 || input_pos.size(0) == B),
              "few_query_attention: input_pos must be int64 [S] or [B, S], got ", input_pos.sizes());
  const at::Tensor pos = input_pos.dim() == 1 ? input_pos.expand({B, S}).contiguous() : input_pos.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * S; ++i) {
    TORCH_CHECK(pp[i] >= 0 && pp[i] < T_, "few_query_attention: position ", pp[i], " outside the cache of ", T_);
  }
  const at::Tensor q = q_in.contiguous(), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  at::Tensor y = at::empty({B, H, S, D}, q.options());
  const int64_t rep = H / KVH, J = rep * S;
  const float scale = 1.f / std::sqrt(float(D));
  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int64_t> len(J), off(J);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, g = i % KVH;
      for (int64_t r = 0; r < rep; ++r) {
        for (int64_t s = 0; s < S; ++s) {
          len[r * S + s] = pp[b * S + s] + 1;
          off[r * S + s] = ((b * H + g * rep + r) * S + s) * D;  // same offsets in q and y
        }
      }
      const int64_t kv = (b * KVH + g) * T_ * D;
      if (q.scalar_type() == at::kFloat) {
        kv_head(q.data_ptr<float>(), kc.data_ptr<float>() + kv, vc.data_ptr<float>() + kv, len.data(), off.data(), J,
                D, scale, y.data_ptr<float>());
      } else {
        kv_head(q.data_ptr<bf16>(), kc.data_ptr<bf16>() + kv, vc.data_ptr<bf16>() + kv, len.data(), off.data(), J, D,
                scale, y.data_ptr<bf16>());
      }
    }
  });
  return y;
}

TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("few_query_attention", &few_query_attention);
}
