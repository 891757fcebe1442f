// Batch-1 CPU matrix-vector products with weight-only quantized weights (formats: kernels/packing.py).
//
// y[m, n] = sum_g s[n, g] * (sum_{k in g} q[n, k] * x[m, k] - z[n, g] * X[m, g]),   X = per-group sums of x.
//
// AVX-512 VNNI path: x is split once per call into 3 signed 8-bit digits (2 for bf16 x, which has only 8
// significant bits) times a power-of-two scale per "lane" of 4-16 consecutive codes, so the inner loop is
// vpdpbusd (64 exact u8 x s8 products per instruction) on codes unpacked with one or two bit ops per 64
// codes; digits and lane scales are recombined in float once per 64 packed bytes. Relative to the largest x
// in its lane each x keeps 21 bits (fp32) or 13 bits (bf16). Elsewhere a plain float loop does the same sum.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define BITFAST_AVX512 1
#include <immintrin.h>
#endif

namespace {

using bf16 = c10::BFloat16;

// One cache line of T (std::vector allocates it 64-byte aligned).
template <typename T>
struct alignas(64) Line {
  T v[64 / sizeof(T)];
};

// Per call: x in the layout the kernel streams it, shared by all rows of W.
struct Prep {
  int64_t K, G, g;          // codes per row, groups per row, group size
  int64_t M, row_bytes;     // rows of x, packed bytes per row of W
  std::vector<float> X;     // [M, G] per-group sums of x (as the kernel sees x)
  std::vector<float> xs;    // plain path: [M, codes per word, K / codes per word] x de-interleaved by slot
  // AVX-512 path
  int64_t chunks = 0;
  std::vector<Line<int8_t>> digits;      // [M, chunks, digits, slots]
  std::vector<Line<float>> lane_scale;   // [M, chunks]
  std::vector<Line<int32_t>> lane_group; // [chunks] group of each lane, relative to chunk_group
  std::vector<int64_t> chunk_group;      // [chunks] first group a chunk touches
  std::vector<uint16_t> group_mask;      // [chunks] which of the 16 scales from chunk_group exist
};

template <typename ST>
struct Weights {
  const uint8_t* q;
  const ST* s;
  const float* zf;  // zero points: fp32, bf16, or neither (symmetric: z0)
  const bf16* zb;
  float z0;
};

struct Out {
  float* f;  // fp32 output, or else bf16
  bf16* b;
  int64_t N;
  void put(int64_t m, int64_t n, float v) const {
    if (f) f[m * N + n] = v;
    else b[m * N + n] = bf16(v);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Plain path: per group, sum over packed words of code * x, x de-interleaved so each slot of a word reads a
// contiguous stream (auto-vectorizes for 2/4/8 bits).

void prep_plain(Prep& p, const float* x, int bits) {
  const int W = bits == 3 ? 8 : 8 / bits;
  const int64_t KW = p.K / W;
  p.xs.resize(p.M * p.K);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* xm = x + m * p.K;
    for (int64_t k = 0; k < p.K; ++k) p.xs[m * p.K + (k % W) * KW + k / W] = xm[k];
    for (int64_t gi = 0; gi < p.G; ++gi) {
      double sum = 0;
      for (int64_t k = gi * p.g; k < std::min(p.K, (gi + 1) * p.g); ++k) sum += xm[k];
      p.X[m * p.G + gi] = float(sum);
    }
  }
}

template <int B, typename ST>
void rows_plain(const Weights<ST>& w, const Prep& p, int64_t n0, int64_t n1, const Out& y) {
  constexpr int W = B == 3 ? 8 : 8 / B;  // codes per packed word
  constexpr uint32_t mask = (1u << B) - 1;
  const int64_t KW = p.K / W;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xs = p.xs.data() + m * p.K;
      float out = 0.f;
      for (int64_t gi = 0; gi < p.G; ++gi) {
        const int64_t j0 = gi * p.g / W, j1 = std::min(p.K, (gi + 1) * p.g) / W, i = n * p.G + gi;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = j0; j < j1; ++j) {
          uint32_t word = B == 3 ? row[3 * j] | row[3 * j + 1] << 8 | row[3 * j + 2] << 16 : row[j];
          if (B == 8) word ^= 0x80;  // stored as q - 128
          for (int k = 0; k < W; ++k) acc += float((word >> (B * k)) & mask) * xs[k * KW + j];
        }
        const float z = w.zf ? w.zf[i] : w.zb ? float(w.zb[i]) : w.z0;
        out += float(w.s[i]) * (acc - z * p.X[m * p.G + gi]);
      }
      y.put(m, n, out);
    }
  }
}

#ifdef BITFAST_AVX512
// ---------------------------------------------------------------------------------------------------------------
// AVX-512 path. A chunk is 64 packed bytes (48 for int3) of one row; it unpacks into `slots` vectors of 64 code
// bytes. Dword lane L of every slot vector holds codes of one "lane" of x: codes [L * cpl, (L + 1) * cpl) of the
// chunk, cpl = codes per lane. Stream position (slot s, byte p) holds chunk code:
//   int8: p        int4: 2p + s        int2: 4p + s        int3: 8 (p / 4) + 4s + p % 4
// (int3: a byte permute puts 3-byte word L into dword lane L, multishift picks codes 4s..4s+3 into its bytes).

template <int B> constexpr int slots() { return B == 8 ? 1 : B == 2 ? 4 : 2; }
template <int B> constexpr int chunk_codes() { return B == 8 ? 64 : B == 2 ? 256 : 128; }
template <int B> constexpr int chunk_bytes() { return B == 3 ? 48 : 64; }
template <int B> constexpr int lane_codes() { return chunk_codes<B>() / 16; }

inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const bf16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

inline __m512i idx_epi32(int (*f)(int)) {
  alignas(64) int v[16];
  for (int i = 0; i < 16; ++i) v[i] = f(i);
  return _mm512_load_si512(v);
}

// Stream-order x for slot s, bytes 16q..16q+15 of a chunk, from natural-order x (zero padded to whole chunks).
template <int B>
inline __m512 stream_x(const float* xc, int q, int s) {
  if constexpr (B == 8) {
    return _mm512_loadu_ps(xc + 16 * q);
  } else if constexpr (B == 4) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(s), idx_epi32([](int i) { return 2 * i; }));
    return _mm512_permutex2var_ps(_mm512_loadu_ps(xc + 32 * q), idx, _mm512_loadu_ps(xc + 32 * q + 16));
  } else if constexpr (B == 3) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(4 * s), idx_epi32([](int i) { return 8 * (i / 4) + i % 4; }));
    return _mm512_permutex2var_ps(_mm512_loadu_ps(xc + 32 * q), idx, _mm512_loadu_ps(xc + 32 * q + 16));
  } else {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(s), idx_epi32([](int i) { return (4 * i) & 31; }));
    const float* b = xc + 64 * q;
    __m512 lo = _mm512_permutex2var_ps(_mm512_loadu_ps(b), idx, _mm512_loadu_ps(b + 16));
    __m512 hi = _mm512_permutex2var_ps(_mm512_loadu_ps(b + 32), idx, _mm512_loadu_ps(b + 48));
    return _mm512_mask_blend_ps(0xFF00, lo, hi);
  }
}

// x -> digits: per lane, x = 2^e * (d0 * 2^16 + d1 * 2^8 + d2) with |.| <= 2^21 (ND 3), or 2^e * (d0 * 2^8 + d1)
// with |.| <= 2^13 (ND 2); every digit fits int8, and sum over a lane of q * integer fits int32 even for
// int8 (4 * 255 * 2^21 < 2^31).
template <int B, int ND>
void prep_avx512(Prep& p, const float* x) {
  constexpr int S = slots<B>(), C = chunk_codes<B>(), CPL = lane_codes<B>();
  constexpr int SHIFT = ND == 3 ? 20 : 12;
  p.chunks = (p.K + C - 1) / C;
  p.digits.resize(p.M * p.chunks * ND * S);
  p.lane_scale.resize(p.M * p.chunks);
  std::vector<float> xf(p.chunks * C), lane_sum(p.chunks * 16);
  const __m512i first_of_4 = idx_epi32([](int i) { return 4 * (i % 4); });
  for (int64_t m = 0; m < p.M; ++m) {
    std::copy(x + m * p.K, x + (m + 1) * p.K, xf.begin());
    std::fill(xf.begin() + p.K, xf.end(), 0.f);
    for (int64_t c = 0; c < p.chunks; ++c) {
      int8_t* dc = p.digits[(m * p.chunks + c) * ND * S].v;
      for (int q = 0; q < 4; ++q) {  // lanes 4q..4q+3: bytes 16q..16q+15 of each slot
        __m512 v[S];
        __m512 mx = _mm512_setzero_ps();
        for (int s = 0; s < S; ++s) {
          v[s] = stream_x<B>(xf.data() + c * C, q, s);
          mx = _mm512_max_ps(mx, _mm512_abs_ps(v[s]));
        }
        mx = _mm512_max_ps(mx, _mm512_permute_ps(mx, 0xB1));
        mx = _mm512_max_ps(mx, _mm512_permute_ps(mx, 0x4E));  // every element: max |x| of its lane
        // e = floor(log2 max), clamped so that 2^(SHIFT - e) and 2^(e - SHIFT) are normal floats.
        __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(mx), 23), _mm512_set1_epi32(127));
        e = _mm512_max_epi32(e, _mm512_set1_epi32(-100));
        const __m512 inv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(127 + SHIFT), e), 23));
        __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127 - SHIFT)), 23));
        scale = _mm512_add_ps(scale, _mm512_mul_ps(mx, _mm512_setzero_ps()));  // inf / nan in x -> nan out
        __m512i sum = _mm512_setzero_si512();
        for (int s = 0; s < S; ++s) {
          __m512i X = _mm512_cvtps_epi32(_mm512_mul_ps(v[s], inv));
          sum = _mm512_add_epi32(sum, X);
          for (int i = ND - 1; i >= 0; --i) {  // balanced base-256 digits, least significant first
            const __m512i low = i ? _mm512_srai_epi32(_mm512_slli_epi32(X, 24), 24) : X;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dc + (i * S + s) * 64 + 16 * q), _mm512_cvtepi32_epi8(low));
            X = _mm512_srai_epi32(_mm512_sub_epi32(X, low), 8);
          }
        }
        sum = _mm512_add_epi32(sum, _mm512_shuffle_epi32(sum, _MM_PERM_CDAB));
        sum = _mm512_add_epi32(sum, _mm512_shuffle_epi32(sum, _MM_PERM_BADC));
        const __m512 lsum = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), scale);
        _mm_storeu_ps(p.lane_scale[m * p.chunks + c].v + 4 * q,
                      _mm512_castps512_ps128(_mm512_permutexvar_ps(first_of_4, scale)));
        _mm_storeu_ps(lane_sum.data() + c * 16 + 4 * q, _mm512_castps512_ps128(_mm512_permutexvar_ps(first_of_4, lsum)));
      }
    }
    // Lanes lie within one group, so group sums are sums of lane sums.
    std::vector<double> X(p.G, 0.0);
    for (int64_t l = 0; l * CPL < p.K; ++l) X[l * CPL / p.g] += lane_sum[l];
    std::copy(X.begin(), X.end(), p.X.begin() + m * p.G);
  }
  // Scales of one chunk: up to 16 consecutive groups from chunk_group, lane L uses lane_group[L] of them.
  p.lane_group.resize(p.chunks);
  p.chunk_group.resize(p.chunks);
  p.group_mask.resize(p.chunks);
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t first = c * C / p.g, count = std::min<int64_t>(16, p.G - first);
    p.chunk_group[c] = first;
    p.group_mask[c] = uint16_t((1u << count) - 1);
    for (int L = 0; L < 16; ++L) p.lane_group[c].v[L] = int32_t(std::min(p.G - 1, (c * C + L * CPL) / p.g) - first);
  }
}

template <int B>
inline __m512i unpack_slot(__m512i d, int s) {
  if constexpr (B == 8) {
    return _mm512_xor_si512(d, _mm512_set1_epi8(-128));  // stored as q - 128
  } else if constexpr (B == 4) {
    return _mm512_and_si512(s ? _mm512_srli_epi16(d, 4) : d, _mm512_set1_epi8(15));
  } else if constexpr (B == 2) {
    return _mm512_and_si512(_mm512_srli_epi16(d, 2 * s), _mm512_set1_epi8(3));
  } else {  // byte b of dword lane L <- bits 3 (4s + b) of that lane's 24-bit word
    const __m512i ctrl = _mm512_set1_epi64(s ? 0x35322F2C'15120F0CLL : 0x29262320'09060300LL);
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, d), _mm512_set1_epi8(7));
  }
}

template <int B, int ND, typename ST>
void rows_avx512(const Weights<ST>& w, const Prep& p, int64_t n0, int64_t n1, const Out& y) {
  constexpr int S = slots<B>(), CB = chunk_bytes<B>();
  // int3: dword lane L <- bytes 3L, 3L+1, 3L+2 (the 4th byte is masked off when unpacking)
  const __m512i word_idx = _mm512_set_epi8(
      47, 47, 46, 45, 44, 44, 43, 42, 41, 41, 40, 39, 38, 38, 37, 36, 35, 35, 34, 33, 32, 32, 31, 30,
      29, 29, 28, 27, 26, 26, 25, 24, 23, 23, 22, 21, 20, 20, 19, 18, 17, 17, 16, 15, 14, 14, 13, 12,
      11, 11, 10, 9, 8, 8, 7, 6, 5, 5, 4, 3, 2, 2, 1, 0);
  // chunks [0, full) can be read as whole 64-byte vectors
  const int64_t full = p.row_bytes < 64 ? 0 : (p.row_bytes - 64) / CB + 1;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * p.row_bytes;
    const ST* s = w.s + n * p.G;
    for (int64_t m = 0; m < p.M; ++m) {
      const Line<int8_t>* xd = p.digits.data() + m * p.chunks * ND * S;
      const Line<float>* sx = p.lane_scale.data() + m * p.chunks;
      // acc += (lane sums of q * digits) * lane scale of x * group scale of W
      auto chunk = [&](__m512 acc, __m512i d, int64_t c) {
        if constexpr (B == 3) d = _mm512_permutexvar_epi8(word_idx, d);
        __m512i v[S];
        for (int i = 0; i < S; ++i) v[i] = unpack_slot<B>(d, i);
        const int8_t* x = xd[c * ND * S].v;
        __m512i t = _mm512_setzero_si512();
        for (int i = 0; i < ND; ++i) {  // most significant digit first, shifting the sum up a digit between
          if (i) t = _mm512_slli_epi32(t, 8);
          for (int j = 0; j < S; ++j) t = _mm512_dpbusd_epi32(t, v[j], _mm512_load_si512(x + (i * S + j) * 64));
        }
        const __m512 sv = _mm512_permutexvar_ps(_mm512_load_si512(p.lane_group[c].v),
                                                load16(s + p.chunk_group[c], p.group_mask[c]));
        return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t), _mm512_load_ps(sx[c].v)), sv, acc);
      };
      __m512 acc = _mm512_setzero_ps();
      int64_t c = 0;
      for (; c < full; ++c) acc = chunk(acc, _mm512_loadu_si512(row + c * CB), c);
      for (; c < p.chunks; ++c) {
        const int64_t left = std::min<int64_t>(p.row_bytes - c * CB, CB);
        acc = chunk(acc, _mm512_maskz_loadu_epi8((1ULL << left) - 1, row + c * CB), c);
      }
      // zero points: - sum_g s z X
      const float* X = p.X.data() + m * p.G;
      for (int64_t g = 0; g < p.G; g += 16) {
        const __mmask16 k = p.G - g >= 16 ? 0xFFFF : (1u << (p.G - g)) - 1;
        const int64_t i = n * p.G + g;
        const __m512 z = w.zf ? load16(w.zf + i, k) : w.zb ? load16(w.zb + i, k) : _mm512_set1_ps(w.z0);
        acc = _mm512_fnmadd_ps(_mm512_mul_ps(load16(s + g, k), z), _mm512_maskz_loadu_ps(k, X + g), acc);
      }
      y.put(m, n, _mm512_reduce_add_ps(acc));
    }
  }
}
#endif

template <typename ST>
using RowsFn = void (*)(const Weights<ST>&, const Prep&, int64_t, int64_t, const Out&);

// Prepares x for the kernel that fits bits and group size; returns that kernel.
template <int B, typename ST>
RowsFn<ST> prepare(Prep& p, const float* x, bool bf16_x) {
#ifdef BITFAST_AVX512
  if (p.g % lane_codes<B>() == 0 || p.G == 1) {  // the VNNI path needs every lane inside one group
    if (bf16_x) {
      prep_avx512<B, 2>(p, x);
      return rows_avx512<B, 2, ST>;
    }
    prep_avx512<B, 3>(p, x);
    return rows_avx512<B, 3, ST>;
  }
#endif
  prep_plain(p, x, B);
  return rows_plain<B, ST>;
}

template <typename ST>
void run(Prep& p, const float* x, bool bf16_x, int64_t bits, const Weights<ST>& w, int64_t N, const Out& y) {
  RowsFn<ST> rows = bits == 2 ? prepare<2, ST>(p, x, bf16_x) : bits == 3 ? prepare<3, ST>(p, x, bf16_x)
                  : bits == 4 ? prepare<4, ST>(p, x, bf16_x) : prepare<8, ST>(p, x, bf16_x);
  // Tasks of at least ~16 KB of weights: smaller ones cost more to hand out than they save.
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / p.row_bytes), [&](int64_t n0, int64_t n1) {
    rows(w, p, n0, n1, y);
  });
}

}  // namespace

torch::Tensor quant_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         std::optional<torch::Tensor> zeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "quant_gemv: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(),
              "quant_gemv: all tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "quant_gemv: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_gemv: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t word = bits == 3 ? 8 : 8 / bits;
  TORCH_CHECK(K > 0 && K % word == 0, "quant_gemv: ", bits, "-bit rows need K to be a positive multiple of ", word,
              ", got K=", K);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == K * bits / 8,
              "quant_gemv: qweight must be [N, K * bits / 8] = [N, ", K * bits / 8, "], got ", qweight.sizes());
  TORCH_CHECK(qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "quant_gemv: ", bits,
              "-bit qweight must be ", bits == 8 ? "int8" : "uint8", ", got ", qweight.scalar_type());
  const int64_t N = qweight.size(0);
  const int64_t g = group_size > 0 ? group_size : K;  // 0: one group per row
  TORCH_CHECK(g % 8 == 0 || g >= K, "quant_gemv: group_size must be a multiple of 8, got ", group_size);
  const int64_t G = (K + g - 1) / g;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, "quant_gemv: scales must be [N, ",
              "ceil(K / group_size)] = [", N, ", ", G, "], got ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16,
              "quant_gemv: scales must be float32 or bfloat16, got ", scales.scalar_type());
  const bool asym = zeros.has_value() && zeros->defined();
  if (asym) {
    TORCH_CHECK(zeros->device().is_cpu() && zeros->sizes() == scales.sizes(),
                "quant_gemv: zeros must be a CPU tensor shaped like scales ", scales.sizes(), ", got ", zeros->sizes());
    TORCH_CHECK(zeros->scalar_type() == at::kFloat || zeros->scalar_type() == at::kBFloat16,
                "quant_gemv: zeros must be float32 or bfloat16, got ", zeros->scalar_type());
  }

  const at::Tensor xf = x.contiguous().to(at::kFloat);  // bf16 x: converted once
  const at::Tensor qw = qweight.contiguous(), sc = scales.contiguous();
  const at::Tensor zc = asym ? zeros->contiguous() : at::Tensor();
  const float* zf = asym && zc.scalar_type() == at::kFloat ? zc.data_ptr<float>() : nullptr;
  const bf16* zb = asym && zc.scalar_type() == at::kBFloat16 ? zc.data_ptr<bf16>() : nullptr;
  const float z0 = float(1 << (bits - 1));
  const auto* q = static_cast<const uint8_t*>(qw.data_ptr());
  at::Tensor y = at::empty({M, N}, x.options());
  const bool bf16_x = x.scalar_type() == at::kBFloat16;
  const Out out{bf16_x ? nullptr : y.data_ptr<float>(), bf16_x ? y.data_ptr<bf16>() : nullptr, N};
  Prep p{K, G, g, M, K * bits / 8, std::vector<float>(M * G)};
  if (sc.scalar_type() == at::kFloat) {
    run(p, xf.data_ptr<float>(), bf16_x, bits, Weights<float>{q, sc.data_ptr<float>(), zf, zb, z0}, N, out);
  } else {
    run(p, xf.data_ptr<float>(), bf16_x, bits, Weights<bf16>{q, sc.data_ptr<bf16>(), zf, zb, z0}, N, out);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_gemv", &quant_gemv, "y = x @ dequantize(qweight, scales, zeros).T for small M",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bits"),
        py::arg("group_size"));
}
