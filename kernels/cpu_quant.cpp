// Batch-1 CPU matrix-vector products with weight-only quantized weights (formats: kernels/packing.py).
//
// y[m, n] = sum_g s[n, g] * (sum_{k in g} q[n, k] * x[m, k] - z[n, g] * X[m, g]),   X = per-group sums of x.
//
// AVX-512 VNNI path: x is split once per call into 3 signed 8-bit digits (2 for bf16 x, which has only 8
// significant bits) times a power-of-two scale per "lane" of 4-16 consecutive codes, so the inner loop is
// vpdpbusd (64 exact u8 x s8 products per instruction) on codes unpacked with one or two bit ops per 64
// codes; digits and lane scales are recombined in float once per 64 packed bytes. Relative to the largest x
// in its lane each x keeps 21 bits (fp32) or 13 bits (bf16). vpdpbusd throughput bounds it (3 per 64 codes
// for fp32 x, whatever the bits), so 4 rows of W share each load of x, and rows are prefetched in software.
// Without AVX-512 VNNI + VBMI, or for 2-bit groups that are not a multiple of 16 codes, a plain float loop
// does the same sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
  std::vector<float> x32;   // bf16 x as fp32 (converted here: an at::to per call costs more than small products)
  std::vector<float> xs;    // plain path: [M, codes per word, K / codes per word] x de-interleaved by slot;
                            // AVX-512 path: scratch
  // AVX-512 path
  int64_t chunks = 0;
  std::vector<float> lane_sum;           // scratch
  std::vector<int64_t> group_of;         // scratch
  std::vector<Line<int8_t>> digits;      // [M, chunks, digits, slots]
  std::vector<Line<float>> lane_scale;   // [M, chunks]
  std::vector<Line<int32_t>> lane_group; // [chunks] group of each lane, relative to chunk_group
  std::vector<int64_t> chunk_group;      // [chunks] first group a chunk touches
  std::vector<uint16_t> group_mask;      // [chunks] which of the 16 scales from chunk_group exist
  bool one_group_per_chunk = false;      // then a chunk's scale is s[chunk_group]
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
// Plain path: one pass over a row's packed words summing code * x * scale of the word's group, x de-interleaved
// so that each slot of a word reads a contiguous stream: the loop auto-vectorizes.

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
  constexpr int W = B == 3 ? 8 : 8 / B;  // codes per packed word; g is a multiple of W (or G == 1)
  constexpr uint32_t mask = (1u << B) - 1;
  const int64_t KW = p.K / W;
  std::vector<float> word_scale(KW);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * p.row_bytes;
    const ST* s = w.s + n * p.G;
    for (int64_t gi = 0; gi < p.G; ++gi) {
      std::fill(&word_scale[gi * p.g / W], &word_scale[0] + std::min(p.K, (gi + 1) * p.g) / W, float(s[gi]));
    }
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xs = p.xs.data() + m * p.K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < KW; ++j) {
        uint32_t word = B == 3 ? row[3 * j] | row[3 * j + 1] << 8 | row[3 * j + 2] << 16 : row[j];
        if (B == 8) word ^= 0x80;  // stored as q - 128
        float t = 0.f;
        for (int k = 0; k < W; ++k) t += float(int32_t((word >> (B * k)) & mask)) * xs[k * KW + j];
        acc += word_scale[j] * t;
      }
      for (int64_t gi = 0, i = n * p.G; gi < p.G; ++gi, ++i) {  // zero points
        const float z = w.zf ? w.zf[i] : w.zb ? float(w.zb[i]) : w.z0;
        acc -= float(s[gi]) * z * p.X[m * p.G + gi];
      }
      y.put(m, n, acc);
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
  const int64_t lanes = p.chunks * 16;
  p.digits.resize(p.M * p.chunks * ND * S);
  p.lane_scale.resize(p.M * p.chunks);
  std::vector<float>& xf = p.xs;  // one row of x, zero padded to whole chunks
  xf.resize(p.chunks * C);
  std::vector<float>& lane_sum = p.lane_sum;
  lane_sum.resize(lanes);
  // Group of every lane, clamped to the last group past K; g is a multiple of CPL (or G == 1).
  std::vector<int64_t>& group_of = p.group_of;
  group_of.resize(lanes);
  for (int64_t l = 0, gi = 0; l < lanes; ++l) {
    if (l * CPL >= (gi + 1) * p.g) ++gi;
    group_of[l] = std::min(gi, p.G - 1);
  }
  const __m512i first_of_4 = idx_epi32([](int i) { return 4 * (i % 4); });
  for (int64_t m = 0; m < p.M; ++m) {
    std::copy(x + m * p.K, x + (m + 1) * p.K, xf.begin());
    std::fill(xf.begin() + p.K, xf.end(), 0.f);
    for (int64_t c = 0; c < p.chunks; ++c) {
      int8_t* dc = p.digits[(m * p.chunks + c) * ND * S].v;
      for (int q = 0; q < 4; ++q) {  // lanes 4q..4q+3: bytes 16q..16q+15 of each slot
        // Max |x| of each lane, in every element of it; as integers, so that a NaN wins (bits: NaN > inf > finite).
        __m512 v[S];
        __m512i mx = _mm512_setzero_si512();
        for (int s = 0; s < S; ++s) {
          v[s] = stream_x<B>(xf.data() + c * C, q, s);
          mx = _mm512_max_epi32(mx, _mm512_castps_si512(_mm512_abs_ps(v[s])));
        }
        mx = _mm512_max_epi32(mx, _mm512_shuffle_epi32(mx, _MM_PERM_CDAB));
        mx = _mm512_max_epi32(mx, _mm512_shuffle_epi32(mx, _MM_PERM_BADC));
        // e = floor(log2 max), clamped so that 2^(SHIFT - e) and 2^(e - SHIFT) are normal floats.
        __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(mx, 23), _mm512_set1_epi32(127));
        e = _mm512_max_epi32(e, _mm512_set1_epi32(-100));
        const __m512 inv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(127 + SHIFT), e), 23));
        __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127 - SHIFT)), 23));
        scale = _mm512_add_ps(scale, _mm512_mul_ps(_mm512_castsi512_ps(mx), _mm512_setzero_ps()));  // inf, nan -> nan
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
    // Lanes lie within one group, so group sums are sums of lane sums (zero past K).
    double sum = 0;
    for (int64_t l = 0; l < lanes; ++l) {
      sum += lane_sum[l];
      if (l + 1 == lanes || group_of[l + 1] != group_of[l]) {
        p.X[m * p.G + group_of[l]] = float(sum);
        sum = 0;
      }
    }
  }
  // Scales of one chunk: up to 16 consecutive groups from chunk_group, lane L uses lane_group[L] of them.
  p.one_group_per_chunk = p.g % C == 0 || p.G == 1;
  p.lane_group.resize(p.chunks);
  p.chunk_group.resize(p.chunks);
  p.group_mask.resize(p.chunks);
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t first = group_of[c * 16];
    p.chunk_group[c] = first;
    p.group_mask[c] = uint16_t((1u << std::min<int64_t>(16, p.G - first)) - 1);
    for (int L = 0; L < 16; ++L) p.lane_group[c].v[L] = int32_t(group_of[c * 16 + L] - first);
  }
}

// The horizontal sums of a[0..3].
inline __m128 hsum4(const __m512* a) {
  // per 128-bit lane: a01 = [a0 el 0+2, a1 el 0+2, a0 el 1+3, a1 el 1+3], a23 likewise
  const __m512 a01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const __m512 a23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  // per 128-bit lane: [a0, a1, a2, a3] summed over that lane
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(a01, a23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(a01, a23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
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

// Rows n..n+R-1 of W times every row of x; R rows share each load of x.
template <int B, int ND, int R, typename ST>
void block_avx512(const Weights<ST>& w, const Prep& p, int64_t n, const Out& y) {
  constexpr int S = slots<B>(), CB = chunk_bytes<B>();
  // int3: dword lane L <- bytes 3L, 3L+1, 3L+2 (the 4th byte is masked off when unpacking)
  const __m512i word_idx = _mm512_set_epi8(
      47, 47, 46, 45, 44, 44, 43, 42, 41, 41, 40, 39, 38, 38, 37, 36, 35, 35, 34, 33, 32, 32, 31, 30,
      29, 29, 28, 27, 26, 26, 25, 24, 23, 23, 22, 21, 20, 20, 19, 18, 17, 17, 16, 15, 14, 14, 13, 12,
      11, 11, 10, 9, 8, 8, 7, 6, 5, 5, 4, 3, 2, 2, 1, 0);
  // chunks [0, full) can be read as whole 64-byte vectors
  const int64_t full = p.row_bytes < 64 ? 0 : (p.row_bytes - 64) / CB + 1;
  const int64_t far = std::max<int64_t>(R * p.row_bytes, 8192);
  const uint8_t* rows = w.q + n * p.row_bytes;
  const ST* s = w.s + n * p.G;
  const bool one_group_per_chunk = p.one_group_per_chunk;
  // Scales and zeros of the rows whose weights the loop below prefetches (see there).
  for (int64_t i = (n + far / p.row_bytes) * p.G, e = i + R * p.G; i < e; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w.s + i), _MM_HINT_T1);
    if (w.zf) _mm_prefetch(reinterpret_cast<const char*>(w.zf + i), _MM_HINT_T1);
    if (w.zb) _mm_prefetch(reinterpret_cast<const char*>(w.zb + i), _MM_HINT_T1);
  }
  for (int64_t m = 0; m < p.M; ++m) {
    const Line<int8_t>* xd = p.digits.data() + m * p.chunks * ND * S;
    const Line<float>* sx = p.lane_scale.data() + m * p.chunks;
    // Zero points first (acc = - sum_g s z X), off the critical path at the end of the block.
    const float* X = p.X.data() + m * p.G;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_setzero_ps();
      for (int64_t g = 0; g < p.G; g += 16) {
        const __mmask16 k = p.G - g >= 16 ? 0xFFFF : (1u << (p.G - g)) - 1;
        const int64_t i = (n + r) * p.G + g;
        const __m512 z = w.zf ? load16(w.zf + i, k) : w.zb ? load16(w.zb + i, k) : _mm512_set1_ps(w.z0);
        acc[r] = _mm512_fnmadd_ps(_mm512_mul_ps(load16(s + r * p.G + g, k), z), _mm512_maskz_loadu_ps(k, X + g), acc[r]);
      }
    }
    // acc += (lane sums of q * digits of x) * lane scale of x * group scale of W
    __m512 group_acc[R];
    for (int r = 0; r < R; ++r) group_acc[r] = _mm512_setzero_ps();
    const int64_t chunks_per_group = p.G == 1 ? p.chunks : p.g / (chunk_codes<B>());
    int64_t chunks_left = chunks_per_group;
    auto chunk = [&](const __m512i* d, int64_t c) {
      __m512i v[R][S], t[R];
      for (int r = 0; r < R; ++r) {
        const __m512i dr = B == 3 ? _mm512_permutexvar_epi8(word_idx, d[r]) : d[r];
        for (int i = 0; i < S; ++i) v[r][i] = unpack_slot<B>(dr, i);
        t[r] = _mm512_setzero_si512();
      }
      const int8_t* x = xd[c * ND * S].v;
      for (int i = 0; i < ND; ++i) {  // most significant digit first, shifting the sums up a digit between
        for (int r = 0; r < R && i; ++r) t[r] = _mm512_slli_epi32(t[r], 8);
        for (int j = 0; j < S; ++j) {
          const __m512i xv = _mm512_load_si512(x + (i * S + j) * 64);
          for (int r = 0; r < R; ++r) t[r] = _mm512_dpbusd_epi32(t[r], v[r][j], xv);
        }
      }
      const __m512 lane_scale = _mm512_load_ps(sx[c].v);
      const int64_t first = p.chunk_group[c];
      if (one_group_per_chunk) {  // a group holds whole chunks: scale by W's group scale once per group
        for (int r = 0; r < R; ++r) group_acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[r]), lane_scale, group_acc[r]);
        if (--chunks_left == 0 || c + 1 == p.chunks) {
          for (int r = 0; r < R; ++r) {
            acc[r] = _mm512_fmadd_ps(group_acc[r], _mm512_set1_ps(float(s[r * p.G + first])), acc[r]);
            group_acc[r] = _mm512_setzero_ps();
          }
          chunks_left = chunks_per_group;
        }
        return;
      }
      for (int r = 0; r < R; ++r) {
        const __m512 sv = _mm512_permutexvar_ps(_mm512_load_si512(p.lane_group[c].v),
                                                load16(s + r * p.G + first, p.group_mask[c]));
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t[r]), lane_scale), sv, acc[r]);
      }
    };
    __m512i d[R];
    int64_t c = 0;
    for (; c < full; ++c) {
      for (int r = 0; r < R; ++r) {
        const uint8_t* a = rows + r * p.row_bytes + c * CB;
        d[r] = _mm512_loadu_si512(a);
        // Interleaved rows defeat much of the hardware prefetching: ask for the same bytes of the next block
        // (at least 8 KB ahead) into L2 and for 2 KB ahead into L1.
        _mm_prefetch(reinterpret_cast<const char*>(a + far), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(a + 2048), _MM_HINT_T0);
      }
      chunk(d, c);
    }
    for (; c < p.chunks; ++c) {
      const __mmask64 k = (1ULL << std::min<int64_t>(p.row_bytes - c * CB, CB)) - 1;
      for (int r = 0; r < R; ++r) d[r] = _mm512_maskz_loadu_epi8(k, rows + r * p.row_bytes + c * CB);
      chunk(d, c);
    }
    if constexpr (R == 4) {
      alignas(16) float out[4];
      _mm_store_ps(out, hsum4(acc));
      for (int r = 0; r < R; ++r) y.put(m, n + r, out[r]);
    } else {
      y.put(m, n, _mm512_reduce_add_ps(acc[0]));
    }
  }
}

template <int B, int ND, typename ST>
void rows_avx512(const Weights<ST>& w, const Prep& p, int64_t n0, int64_t n1, const Out& y) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block_avx512<B, ND, 4>(w, p, n, y);
  for (; n < n1; ++n) block_avx512<B, ND, 1>(w, p, n, y);
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
  // Tasks of at least ~64 KB of weights: smaller ones cost more to hand out than they save.
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / p.row_bytes), [&](int64_t n0, int64_t n1) {
    rows(w, p, n0, n1, y);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Dequantize: W[n, k] = (q - z) * s in fp32, stored as OT, the float weight a many-row product (prefill, scoring)
// multiplies by. The same math as kernels.packing.dequantize_packed, rows split across threads.

template <int B, typename OT, typename ST, typename ZT>
void dequantize_rows(const uint8_t* q, const ST* s, const ZT* z, float z0, int64_t K, int64_t g, int64_t G,
                     int64_t n0, int64_t n1, OT* out) {
  constexpr int W = B == 3 ? 8 : 8 / B;  // codes per packed word
  constexpr uint32_t mask = (1u << B) - 1;
  const int64_t row_bytes = K * B / 8;
  std::vector<float> codes(K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = q + n * row_bytes;
    if constexpr (B == 8) {
      for (int64_t k = 0; k < K; ++k) codes[k] = float(int32_t(int8_t(row[k])) + 128);  // stored as q - 128
    } else {
      for (int64_t j = 0; j < K / W; ++j) {
        const uint32_t word = B == 3 ? row[3 * j] | row[3 * j + 1] << 8 | row[3 * j + 2] << 16 : row[j];
        for (int i = 0; i < W; ++i) codes[j * W + i] = float((word >> (B * i)) & mask);
      }
    }
    OT* o = out + n * K;
    for (int64_t gi = 0; gi < G; ++gi) {
      const float sc = float(s[n * G + gi]), zp = z ? float(z[n * G + gi]) : z0;
      const int64_t end = std::min(K, (gi + 1) * g);
#pragma omp simd
      for (int64_t k = gi * g; k < end; ++k) o[k] = OT((codes[k] - zp) * sc);
    }
  }
}

template <int B, typename OT, typename ST, typename ZT>
void dequantize_all(const uint8_t* q, const ST* s, const ZT* z, float z0, int64_t N, int64_t K, int64_t g,
                    int64_t G, OT* out) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    dequantize_rows<B, OT, ST, ZT>(q, s, z, z0, K, g, G, n0, n1, out);
  });
}

template <typename OT, typename ST, typename ZT>
void dequantize_bits(int64_t bits, const uint8_t* q, const ST* s, const ZT* z, float z0, int64_t N, int64_t K,
                     int64_t g, int64_t G, OT* out) {
  if (bits == 2) dequantize_all<2, OT, ST, ZT>(q, s, z, z0, N, K, g, G, out);
  else if (bits == 3) dequantize_all<3, OT, ST, ZT>(q, s, z, z0, N, K, g, G, out);
  else if (bits == 4) dequantize_all<4, OT, ST, ZT>(q, s, z, z0, N, K, g, G, out);
  else dequantize_all<8, OT, ST, ZT>(q, s, z, z0, N, K, g, G, out);
}

template <typename OT, typename ST>
void dequantize_zeros(int64_t bits, const uint8_t* q, const ST* s, const at::Tensor& zc, float z0, int64_t N,
                      int64_t K, int64_t g, int64_t G, OT* out) {
  if (!zc.defined()) dequantize_bits<OT, ST, float>(bits, q, s, nullptr, z0, N, K, g, G, out);
  else if (zc.scalar_type() == at::kFloat) dequantize_bits<OT, ST, float>(bits, q, s, zc.data_ptr<float>(), z0, N, K, g, G, out);
  else dequantize_bits<OT, ST, bf16>(bits, q, s, zc.data_ptr<bf16>(), z0, N, K, g, G, out);
}

}  // namespace

// [N, K] float weights of `dtype` (fp32 or bf16) from a QuantLinear's qweight, scales and zeros; the schema is
// defined in kernels/cpu.py.
at::Tensor quant_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                            int64_t bits, int64_t group_size, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "quant_dequantize: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(qweight.device().is_cpu() && scales.device().is_cpu(), "quant_dequantize: tensors must be on the CPU");
  const int64_t word = bits == 3 ? 8 : 8 / bits;
  TORCH_CHECK(K > 0 && K % word == 0, "quant_dequantize: ", bits, "-bit rows need K to be a multiple of ", word, ", got ", K);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == K * bits / 8 &&
              qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "quant_dequantize: qweight must be [N, K * bits / 8] ", bits == 8 ? "int8" : "uint8", ", got ",
              qweight.sizes(), " ", qweight.scalar_type());
  const int64_t N = qweight.size(0), g = group_size ? group_size : K, G = (K + g - 1) / g;
  TORCH_CHECK(group_size >= 0 && scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G &&
              (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16),
              "quant_dequantize: scales must be fp32 or bf16 [", N, ", ", G, "], got ", scales.sizes());
  const bool asym = zeros.has_value() && zeros->defined();
  TORCH_CHECK(!asym || (zeros->device().is_cpu() && zeros->sizes() == scales.sizes() &&
                        (zeros->scalar_type() == at::kFloat || zeros->scalar_type() == at::kBFloat16)),
              "quant_dequantize: zeros must be fp32 or bf16 shaped like scales");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "quant_dequantize: dtype must be float32 or bfloat16");
  const at::Tensor qw = qweight.contiguous(), sc = scales.contiguous();
  const at::Tensor zc = asym ? zeros->contiguous() : at::Tensor();
  const auto* q = static_cast<const uint8_t*>(qw.data_ptr());
  const float z0 = float(1 << (bits - 1));
  at::Tensor out = at::empty({N, K}, qweight.options().dtype(dtype));
  if (dtype == at::kFloat) {
    if (sc.scalar_type() == at::kFloat) dequantize_zeros<float, float>(bits, q, sc.data_ptr<float>(), zc, z0, N, K, g, G, out.data_ptr<float>());
    else dequantize_zeros<float, bf16>(bits, q, sc.data_ptr<bf16>(), zc, z0, N, K, g, G, out.data_ptr<float>());
  } else {
    if (sc.scalar_type() == at::kFloat) dequantize_zeros<bf16, float>(bits, q, sc.data_ptr<float>(), zc, z0, N, K, g, G, out.data_ptr<bf16>());
    else dequantize_zeros<bf16, bf16>(bits, q, sc.data_ptr<bf16>(), zc, z0, N, K, g, G, out.data_ptr<bf16>());
  }
  return out;
}

// x [..., K] -> [..., N]; the schema is defined in kernels/cpu.py.
at::Tensor quant_gemv(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "quant_gemv: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(x_in.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(),
              "quant_gemv: all tensors must be on the CPU");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) > 0, "quant_gemv: x must be [..., K], K > 0, got ", x_in.sizes());
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)});
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_gemv: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t word = bits == 3 ? 8 : 8 / bits;
  TORCH_CHECK(K % word == 0, "quant_gemv: ", bits, "-bit rows need K to be a multiple of ", word, ", got K=", K);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == K * bits / 8,
              "quant_gemv: qweight must be [N, K * bits / 8] = [N, ", K * bits / 8, "], got ", qweight.sizes());
  TORCH_CHECK(qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "quant_gemv: ", bits,
              "-bit qweight must be ", bits == 8 ? "int8" : "uint8", ", got ", qweight.scalar_type());
  const int64_t N = qweight.size(0);
  const int64_t g = group_size ? group_size : K;  // 0: one group per row
  TORCH_CHECK(g > 0 && (g % 8 == 0 || g >= K), "quant_gemv: group_size must be 0 or a positive multiple of 8, got ",
              group_size);
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

  const at::Tensor xc = x.contiguous();
  const at::Tensor qw = qweight.contiguous(), sc = scales.contiguous();
  const at::Tensor zc = asym ? zeros->contiguous() : at::Tensor();
  const float* zf = asym && zc.scalar_type() == at::kFloat ? zc.data_ptr<float>() : nullptr;
  const bf16* zb = asym && zc.scalar_type() == at::kBFloat16 ? zc.data_ptr<bf16>() : nullptr;
  const float z0 = float(1 << (bits - 1));
  const auto* q = static_cast<const uint8_t*>(qw.data_ptr());
  std::vector<int64_t> y_shape = x_in.sizes().vec();
  y_shape.back() = N;
  at::Tensor y = at::empty(y_shape, x.options());
  const bool bf16_x = x.scalar_type() == at::kBFloat16;
  const Out out{bf16_x ? nullptr : y.data_ptr<float>(), bf16_x ? y.data_ptr<bf16>() : nullptr, N};
  thread_local Prep p;  // keeps its buffers from call to call
  p.K = K, p.G = G, p.g = g, p.M = M, p.row_bytes = K * bits / 8;
  p.X.resize(M * G);
  const float* xf = nullptr;
  if (bf16_x) {
    p.x32.resize(M * K);
    const bf16* xb = xc.data_ptr<bf16>();
    for (int64_t i = 0; i < M * K; ++i) p.x32[i] = float(xb[i]);
    xf = p.x32.data();
  } else {
    xf = xc.data_ptr<float>();
  }
  if (sc.scalar_type() == at::kFloat) {
    run(p, xf, bf16_x, bits, Weights<float>{q, sc.data_ptr<float>(), zf, zb, z0}, N, out);
  } else {
    run(p, xf, bf16_x, bits, Weights<bf16>{q, sc.data_ptr<bf16>(), zf, zb, z0}, N, out);
  }
  return y;
}

TORCH_LIBRARY_IMPL(bitfast, CPU, m) {
  m.impl("quant_gemv", &quant_gemv);
  m.impl("quant_dequantize", &quant_dequantize);
}
