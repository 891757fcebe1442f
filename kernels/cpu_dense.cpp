// Few-row CPU matrix-vector products with dense fp32 or bf16 weights: y[m, n] = sum_k x[m, k] * w[n, k],
// M <= BITFAST_MAX_ROWS (kernels/formats.py FEW_ROWS, passed by kernels/cpu.py's build).
//
// What a float model's decode (M = 1) and speculative verify (M = k + 1 tokens) spend their time in. One row of W
// at a time, all rows of x against it: a single sequential stream of W is what this class of CPU prefetches best
// (reading 4 rows of W side by side ran at a fraction of the bandwidth), and x stays in L1. bf16 uses vdpbf16ps (32
// products per instruction, twice the fp32 FMA rate), so a 4-row verify stays close to memory-bound where an fp32
// loop becomes compute-bound.
//
// Every output is summed in the same order whatever M is (two vector accumulators over alternating chunks of K,
// then one horizontal sum): a token's result does not depend on the other rows in the call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define BITFAST_DENSE_AVX512 1
#include <immintrin.h>
#endif

namespace {

using bf16 = c10::BFloat16;
#ifndef BITFAST_MAX_ROWS
#error "BITFAST_MAX_ROWS (kernels/formats.py FEW_ROWS) must be defined: kernels/cpu.py's build passes it"
#endif
constexpr int64_t kMaxRows = BITFAST_MAX_ROWS;
static_assert(kMaxRows >= 1, "BITFAST_MAX_ROWS must be at least 1");
constexpr int64_t kPrefetchBytes = 16384;

#ifdef BITFAST_DENSE_AVX512
// One vector step over K: L values of x and w multiplied into a 16-lane fp32 accumulator.
template <typename T> struct Step;
template <> struct Step<float> {
  static constexpr int64_t L = 16;
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load(const float* p, int64_t left) {  // masked: zeros past the end
    return _mm512_maskz_loadu_ps(left >= L ? __mmask16(0xffff) : __mmask16((1u << left) - 1), p);
  }
  static __m512 madd(__m512 acc, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, acc); }
};
template <> struct Step<bf16> {
  static constexpr int64_t L = 32;
  static __m512bh load(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh load(const bf16* p, int64_t left) {
    return (__m512bh)_mm512_maskz_loadu_epi16(left >= L ? __mmask32(~0u) : __mmask32((1u << left) - 1), p);
  }
  static __m512 madd(__m512 acc, __m512bh x, __m512bh w) { return _mm512_dpbf16_ps(acc, x, w); }
};

// All M rows of x against one row of W; the 2 x M accumulators stay in registers (32 of them at M = 8).
template <int M, typename T>
void dot_rows(const T* x, const T* wr, int64_t K, int64_t N, T* y) {
  using S = Step<T>;
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 * S::L <= K; k += 2 * S::L) {
    // From 3 rows of x, both cache lines of this step kPrefetchBytes ahead into L2: the work per line leaves
    // too few loads in flight for the hardware stream alone (bf16, 4 rows, scratch microbenchmark: W read well
    // below the 1-row bandwidth without it, about at it with it). At 1-2 rows the extra instructions only cost.
    if constexpr (M >= 3) {
      const char* ahead = reinterpret_cast<const char*>(wr + k) + kPrefetchBytes;
      _mm_prefetch(ahead, _MM_HINT_T1);
      _mm_prefetch(ahead + 64, _MM_HINT_T1);
    }
    const auto w0 = S::load(wr + k), w1 = S::load(wr + k + S::L);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = S::madd(acc[m][0], S::load(x + m * K + k), w0);
      acc[m][1] = S::madd(acc[m][1], S::load(x + m * K + k + S::L), w1);
    }
  }
  // Tail, under 2 steps; fixed accumulator indices keep acc in registers (a runtime index sent it to memory,
  // which made 8 rows cost twice 4).
  for (int u = 0; u < 2 && k < K; ++u, k += S::L) {
    const auto wv = S::load(wr + k, K - k);
    for (int m = 0; m < M; ++m) {
      const auto xv = S::load(x + m * K + k, K - k);
      if (u == 0) acc[m][0] = S::madd(acc[m][0], xv, wv);
      else acc[m][1] = S::madd(acc[m][1], xv, wv);
    }
  }
  for (int m = 0; m < M; ++m) y[m * N] = T(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));
}

template <int M, typename T>
void rows(const T* x, const T* w, int64_t K, int64_t N, int64_t n0, int64_t n1, T* y) {
  for (int64_t n = n0; n < n1; ++n) dot_rows<M>(x, w + n * K, K, N, y + n);
}
#else
// Portable: the same two-accumulator order, in scalar lanes of 16 (any compiler vectorizes it).
template <int M, typename T>
void rows(const T* x, const T* w, int64_t K, int64_t N, int64_t n0, int64_t n1, T* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    for (int m = 0; m < M; ++m) {
      float acc[16] = {};
      for (int64_t k = 0; k < K; ++k) acc[k % 16] += float(x[m * K + k]) * float(wr[k]);
      float v = 0.f;
      for (float a : acc) v += a;
      y[m * N + n] = T(v);
    }
  }
}
#endif

template <int M, typename T>
void run(const T* x, const T* w, int64_t K, int64_t N, T* y) {
  // Tasks of at least ~64 KB of weights: smaller ones cost more to hand out than they save.
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / (K * int64_t(sizeof(T)))),
                   [&](int64_t n0, int64_t n1) { rows<M>(x, w, K, N, n0, n1, y); });
}

// run<M> for 1 <= M <= Max: one instantiation per row count up to kMaxRows.
template <int Max, typename T>
void run_rows(int64_t M, const T* x, const T* w, int64_t K, int64_t N, T* y) {
  if constexpr (Max > 1) {
    if (M < Max) return run_rows<Max - 1>(M, x, w, K, N, y);
  }
  return run<Max>(x, w, K, N, y);
}

}  // namespace

// x [..., K] with at most kMaxRows rows, w [N, K] of x's dtype -> [..., N]; the schema is defined in kernels/cpu.py.
at::Tensor dense_gemv(const at::Tensor& x_in, const at::Tensor& weight) {
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu(), "dense_gemv: x and w must be CPU tensors");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "dense_gemv: x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type(), "dense_gemv: w must have x's dtype ", x_in.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) > 0, "dense_gemv: x must be [..., K], K > 0, got ", x_in.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x_in.size(-1), "dense_gemv: w must be [N, ", x_in.size(-1),
              "], got ", weight.sizes());
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M <= kMaxRows, "dense_gemv: at most ", kMaxRows, " rows of x, got ", M);
  const at::Tensor w = weight.contiguous();
  std::vector<int64_t> y_shape = x_in.sizes().vec();
  y_shape.back() = N;
  at::Tensor y = at::empty(y_shape, x.options());
  if (M == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    run_rows<kMaxRows>(M, x.data_ptr<float>(), w.data_ptr<float>(), K, N, y.data_ptr<float>());
  } else {
    run_rows<kMaxRows>(M, x.data_ptr<bf16>(), w.data_ptr<bf16>(), K, N, y.data_ptr<bf16>());
  }
  return y;
}

TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("dense_gemv", &dense_gemv);
}
