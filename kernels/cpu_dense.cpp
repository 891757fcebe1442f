// Few-row CPU matrix-vector products with dense fp32 or bf16 weights: y[m, n] = sum_k x[m, k] * w[n, k], M <= 8.
//
// What a speculative verify (M = k + 1 tokens) spends its time in; model.Linear sends it 3-8 rows (kernels/dispatch.py
// says why not 1-2). One row of W at a time, all rows of x against it: a single sequential stream of W is what
// this class of CPU prefetches best (reading 4 rows of W side by side ran at half the bandwidth), and x stays in L1.
// bf16 uses vdpbf16ps (32 products per instruction, twice the fp32 FMA rate), so a 4-row verify stays close to
// memory-bound where an fp32 loop becomes compute-bound.
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
constexpr int64_t kMaxRows = 8;

#ifdef BITFAST_DENSE_AVX512
// One vector step over K: L values of x and w multiplied into a 16-lane fp32 accumulator.
template <typename T> struct Step;
template <> struct Step<float> {
  static constexpr int64_t L = 16;
  static __m512 load(const float* p, int64_t left) {
    return _mm512_maskz_loadu_ps(left >= L ? __mmask16(0xffff) : __mmask16((1u << left) - 1), p);
  }
  static __m512 madd(__m512 acc, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, acc); }
};
template <> struct Step<bf16> {
  static constexpr int64_t L = 32;
  static __m512bh load(const bf16* p, int64_t left) {
    return (__m512bh)_mm512_maskz_loadu_epi16(left >= L ? __mmask32(~0u) : __mmask32((1u << left) - 1), p);
  }
  static __m512 madd(__m512 acc, __m512bh x, __m512bh w) { return _mm512_dpbf16_ps(acc, x, w); }
};

// Up to 4 rows of x against one row of W (more would spill the 2 x M accumulators out of registers).
template <int M, typename T>
void dot_rows(const T* x, const T* wr, int64_t K, int64_t N, T* y) {
  using S = Step<T>;
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 * S::L <= K; k += 2 * S::L) {
    // Two rows ahead: the hardware stream alone leaves the 4-row products short of bandwidth.
    _mm_prefetch(reinterpret_cast<const char*>(wr + 2 * K + k), _MM_HINT_T0);
    const auto w0 = S::load(wr + k, S::L), w1 = S::load(wr + k + S::L, S::L);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = S::madd(acc[m][0], S::load(x + m * K + k, S::L), w0);
      acc[m][1] = S::madd(acc[m][1], S::load(x + m * K + k + S::L, S::L), w1);
    }
  }
  for (int u = 0; k < K; k += S::L, u ^= 1) {  // tail: masked loads read zeros past K
    const auto wv = S::load(wr + k, K - k);
    for (int m = 0; m < M; ++m) acc[m][u] = S::madd(acc[m][u], S::load(x + m * K + k, K - k), wv);
  }
  for (int m = 0; m < M; ++m) y[m * N] = T(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));
}

template <int M, typename T>
void rows(const T* x, const T* w, int64_t K, int64_t N, int64_t n0, int64_t n1, T* y) {
  for (int64_t n = n0; n < n1; ++n) {
    if constexpr (M <= 4) {
      dot_rows<M>(x, w + n * K, K, N, y + n);
    } else {  // the second block of x finds the row of W in L1
      dot_rows<4>(x, w + n * K, K, N, y + n);
      dot_rows<M - 4>(x + 4 * K, w + n * K, K, N, y + 4 * N + n);
    }
  }
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

template <typename T>
void run_rows(int64_t M, const T* x, const T* w, int64_t K, int64_t N, T* y) {
  switch (M) {
    case 1: return run<1>(x, w, K, N, y);
    case 2: return run<2>(x, w, K, N, y);
    case 3: return run<3>(x, w, K, N, y);
    case 4: return run<4>(x, w, K, N, y);
    case 5: return run<5>(x, w, K, N, y);
    case 6: return run<6>(x, w, K, N, y);
    case 7: return run<7>(x, w, K, N, y);
    default: return run<8>(x, w, K, N, y);
  }
}

}  // namespace

// x [..., K] with at most 8 rows, w [N, K] of x's dtype -> [..., N]; the schema is defined in kernels/cpu.py.
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
    run_rows(M, x.data_ptr<float>(), w.data_ptr<float>(), K, N, y.data_ptr<float>());
  } else {
    run_rows(M, x.data_ptr<bf16>(), w.data_ptr<bf16>(), K, N, y.data_ptr<bf16>());
  }
  return y;
}

TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("dense_gemv", &dense_gemv);
}
