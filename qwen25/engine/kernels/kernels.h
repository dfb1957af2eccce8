// The hot loops of the decode step, each in a portable and an AVX-512 version, and the
// numerics shared by both: bf16 conversions and the model's rounding points.
//
// The AVX-512 functions are compiled for that target only (#pragma GCC target), so the
// library still loads and runs the portable versions on CPUs without AVX-512.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace q25 {

using bf16 = uint16_t;

enum Dtype { F32 = 0, BF16 = 1 };
enum Isa { PORTABLE = 0, AVX512 = 1 };

// ---- scalar conversions and the model's rounding points ------------------------------

inline float bf16_to_f32(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 f32_to_bf16(float f) {  // round to nearest even, as torch does; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16(u >> 16);
}

template <typename T> inline float ld(const T* p, int64_t i);
template <> inline float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float ld<bf16>(const bf16* p, int64_t i) { return bf16_to_f32(p[i]); }

template <typename T> inline void st(T* p, int64_t i, float v);
template <> inline void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void st<bf16>(bf16* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

// The value a tensor of dtype T would hold: identity for fp32, rounding for bf16.
template <typename T> inline float rnd(float v);
template <> inline float rnd<float>(float v) { return v; }
template <> inline float rnd<bf16>(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// ---- kernel table: the hot loops, one portable and one AVX-512 implementation --------

// y[m * ldy + n] = sum_k x[m * K + k] * W[n * K + k] for n in [n0, n1), m < M.
template <typename T>
using RowsFn = void (*)(const T* W, int64_t K, const T* x, int64_t M, float* y, int64_t ldy,
                        int64_t n0, int64_t n1);
// For G query heads sharing one KV head (GQA): scores[h * stride + t] = scale * q[h] . k[t],
// q fp32 [G, d], keys [L, d] of dtype T.
template <typename T>
using ScoresFn = void (*)(const float* q, int64_t G, const T* k, int64_t L, int64_t d, float scale,
                          float* scores, int64_t stride);
// out[h * d + i] += sum_t p[h * stride + t] * v[t * d + i]
template <typename T>
using MixFn = void (*)(const float* p, int64_t G, int64_t stride, const T* v, int64_t L, int64_t d, float* out);
// x[i] = exp(x[i] - shift); returns the sum of the results.
using ExpSumFn = float (*)(float* x, int64_t n, float shift);
// silu(g) for a vector: g / (1 + exp(-g)), fp32.
using SiluFn = void (*)(const float* g, float* out, int64_t n);

template <typename T> void rows_portable(const T* W, int64_t K, const T* x, int64_t M, float* y,
                                         int64_t ldy, int64_t n0, int64_t n1) {
  std::vector<float> xf(size_t(M * K));
  for (int64_t i = 0; i < M * K; ++i) xf[size_t(i)] = ld(x, i);
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xf.data() + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * ld(w, k);
      y[m * ldy + n] = acc;
    }
  }
}

template <typename T> void scores_portable(const float* q, int64_t G, const T* k, int64_t L, int64_t d,
                                           float scale, float* scores, int64_t stride) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t h = 0; h < G; ++h) {
      float acc = 0.f;
      for (int64_t i = 0; i < d; ++i) acc += q[h * d + i] * ld(k, t * d + i);
      scores[h * stride + t] = acc * scale;
    }
}

template <typename T> void mix_portable(const float* p, int64_t G, int64_t stride, const T* v, int64_t L,
                                        int64_t d, float* out) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t h = 0; h < G; ++h)
      for (int64_t i = 0; i < d; ++i) out[h * d + i] += p[h * stride + t] * ld(v, t * d + i);
}

inline float expsum_portable(float* x, int64_t n, float shift) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - shift));
  return s;
}

inline void silu_portable(const float* g, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i]));
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")

// exp on 16 lanes: n = round(x log2 e), r = x - n ln 2 (two-part ln 2), degree-6 Taylor
// polynomial on |r| <= ln2/2 (truncation error < 2e-7 relative), times 2^n via scalef.
// Inputs are clamped to [-87.3, 88.7] so results stay finite and normal.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail16(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }
inline __mmask32 tail32(int64_t left) {
  return left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1ull << left) - 1);
}

// 16 bf16 -> 16 fp32 (exact: a bf16 is the top half of an fp32).
inline __m512 cvt_bf16x16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// y[m * ldy] = w . x[m] for one weight row and MM inputs. Each thread walks its rows front
// to back, so its reads are one linear run of memory that the hardware prefetcher follows
// (interleaving 4 rows, or prefetching by hand at batch 1, measured 35-45% slower here).
// U = 2 accumulators per input hide the multiply-add latency; blocks of 32 k-values
// alternate between them and a masked tail goes to the first, so every input is summed in
// the same order whatever MM is: a result never depends on what else is in the batch.
// vdpbf16ps multiplies bf16 pairs exactly and accumulates in fp32 (denormals flushed).
//
// With PF the weights 2 KiB ahead are prefetched: when more than 4 inputs share the pass
// it is compute-heavy enough for the hardware prefetcher to fall behind (measured: 8
// inputs, 0.5B bf16, one core: 104 -> 90 ms per step; no gain for 4 inputs or fewer).
constexpr int kPrefetchBytes = 2048;

template <int MM, bool PF>
inline void tile_bf16(const bf16* w, int64_t K, const bf16* x, float* y, int64_t ldy) {
  __m512 acc[MM][2];
  for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int u = 0; u < 2; ++u) {
      if constexpr (PF) _mm_prefetch((const char*)(w + k + 32 * u) + kPrefetchBytes, _MM_HINT_T0);
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int m = 0; m < MM; ++m)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u));
    }
  for (; k < K; k += 32) {
    __mmask32 mk = tail32(K - k);
    __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k);
    for (int m = 0; m < MM; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mk, x + m * K + k));
  }
  for (int m = 0; m < MM; ++m) y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

template <int MM, bool PF>
inline void tile_f32(const float* w, int64_t K, const float* x, float* y, int64_t ldy) {
  __m512 acc[MM][2];
  for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int u = 0; u < 2; ++u) {
      if constexpr (PF) _mm_prefetch((const char*)(w + k + 16 * u) + kPrefetchBytes, _MM_HINT_T0);
      __m512 wv = _mm512_loadu_ps(w + k + 16 * u);
      for (int m = 0; m < MM; ++m) acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[m][u]);
    }
  for (; k < K; k += 16) {
    __mmask16 mk = tail16(K - k);
    __m512 wv = _mm512_maskz_loadu_ps(mk, w + k);
    for (int m = 0; m < MM; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x + m * K + k), acc[m][0]);
  }
  for (int m = 0; m < MM; ++m) y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

template <typename T, int MM, bool PF = false>
inline void tile(const T* w, int64_t K, const T* x, float* y, int64_t ldy) {
  if constexpr (sizeof(T) == 2) tile_bf16<MM, PF>(w, K, x, y, ldy);
  else tile_f32<MM, PF>(w, K, x, y, ldy);
}

// One weight row, all M inputs, taken 4 at a time: the row, just read, is in L1 for the
// next group. (Two rows at a time halve the input loads but measured 1.4-1.8x slower: two
// interleaved streams defeat the prefetcher.)
template <typename T>
inline void row_all_inputs(const T* w, int64_t K, const T* x, int64_t M, float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const T* xm = x + m0 * K;
    float* ym = y + m0 * ldy;
    const bool pf = M > 4 && m0 == 0;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: tile<T, 1>(w, K, xm, ym, ldy); break;
      case 2: tile<T, 2>(w, K, xm, ym, ldy); break;
      case 3: tile<T, 3>(w, K, xm, ym, ldy); break;
      default: pf ? tile<T, 4, true>(w, K, xm, ym, ldy) : tile<T, 4>(w, K, xm, ym, ldy); break;
    }
  }
}

template <typename T>
void rows_avx512(const T* W, int64_t K, const T* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) row_all_inputs<T>(W + n * K, K, x, M, y + n, ldy);
}

template <typename T>
inline __m512 load16(const T* p, __mmask16 mk) {
  if constexpr (sizeof(T) == 2) return cvt_bf16x16(_mm256_maskz_loadu_epi16(mk, p));
  else return _mm512_maskz_loadu_ps(mk, p);
}

// Each key row is loaded once (it stays in L1 while the G heads use it).
template <typename T>
void scores_avx512(const float* q, int64_t G, const T* k, int64_t L, int64_t d, float scale, float* scores,
                   int64_t stride) {
  for (int64_t t = 0; t < L; ++t) {
    const T* kt = k + t * d;
    for (int64_t h = 0; h < G; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 16) {
        __mmask16 mk = tail16(d - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + h * d + i), load16(kt + i, mk), acc);
      }
      scores[h * stride + t] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

// 16 output dims of up to 8 heads live in registers while the keys stream past.
template <typename T>
void mix_avx512(const float* p, int64_t G, int64_t stride, const T* v, int64_t L, int64_t d, float* out) {
  for (int64_t i = 0; i < d; i += 16) {
    __mmask16 mk = tail16(d - i);
    for (int64_t h0 = 0; h0 < G; h0 += 8) {
      int64_t hn = std::min<int64_t>(8, G - h0);
      __m512 acc[8];
      for (int64_t h = 0; h < hn; ++h) acc[h] = _mm512_maskz_loadu_ps(mk, out + (h0 + h) * d + i);
      for (int64_t t = 0; t < L; ++t) {
        __m512 vv = load16(v + t * d + i, mk);
        for (int64_t h = 0; h < hn; ++h)
          acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[(h0 + h) * stride + t]), vv, acc[h]);
      }
      for (int64_t h = 0; h < hn; ++h) _mm512_mask_storeu_ps(out + (h0 + h) * d + i, mk, acc[h]);
    }
  }
}

inline float expsum_avx512(float* x, int64_t n, float shift) {
  __m512 s = _mm512_setzero_ps(), sh = _mm512_set1_ps(shift);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 mk = tail16(n - i);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, x + i), sh));
    _mm512_mask_storeu_ps(x + i, mk, e);
    s = _mm512_add_ps(s, _mm512_maskz_mov_ps(mk, e));
  }
  return _mm512_reduce_add_ps(s);
}

inline void silu_avx512(const float* g, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 mk = tail16(n - i);
    __m512 v = _mm512_maskz_loadu_ps(mk, g + i);
    __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)));
    _mm512_mask_storeu_ps(out + i, mk, _mm512_div_ps(v, den));
  }
}

// Sum of p[0 .. n), n a multiple of 64: one linear stream (the bandwidth probe's item).
inline double read_sum_avx512(const float* p, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

#pragma GCC pop_options

inline bool cpu_has_avx512f() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }
inline bool cpu_has_avx512bf16() { return cpu_has_avx512f() && __builtin_cpu_supports("avx512bf16"); }

template <typename T> struct Kernels {
  RowsFn<T> rows;
  ScoresFn<T> scores;
  MixFn<T> mix;
  ExpSumFn expsum;
  SiluFn silu;
};

template <typename T> Kernels<T> kernels_for(int isa) {
  if (isa == AVX512) return {rows_avx512<T>, scores_avx512<T>, mix_avx512<T>, expsum_avx512, silu_avx512};
  return {rows_portable<T>, scores_portable<T>, mix_portable<T>, expsum_portable, silu_portable};
}

}  // namespace q25
