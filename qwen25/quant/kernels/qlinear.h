// y = x @ W^T for weight-only quantized W (int8 or int4 codes, per-group scale and zero),
// for the decode shapes (a few input rows) on x86 CPUs with AVX-512: the row kernels,
// shared by qlinear.cpp (QuantLinear's forward) and the engine's decoder (decode.cpp).
//
// Why: at decode time a linear layer is a matrix-vector product whose cost is reading W
// from memory; int8 codes are half the bytes of bf16 and int4 a quarter. Dequantising to a
// float tensor first (the PyTorch path) writes and re-reads a full float copy per call.
// Here each weight row is read once, its codes widened in registers, and every input row
// of the batch is multiplied with them while they are there.
//
// Numerics: for each (row n, group g) the integer difference (q - zero) is exact in fp32,
// the products with x are summed in fp32 (FMA) per group, then scaled by scale[n, g] and
// added to a per-row vector accumulator; one horizontal sum at the end. This equals the
// fp32 matmul with the dequantised weights (q - zero) * scale up to summation order. Each
// input row is summed in the same order whatever else is in the batch and whatever the
// thread count: results are batch-invariant bit for bit.
//
// Layouts (qwen25/quant/rtn.py): int8 codes [N, K] uint8; int4 codes [N, K/2] uint8, input
// column 2j in the low nibble of byte j; scales [N, K/gs] fp32; zeros [N, K/gs] uint8.
// Preconditions, checked by the caller: int8 needs gs % 16 == 0, int4 gs % 32 == 0.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace q25q {

// One quantized projection as the kernels read it (codes == nullptr: not quantized).
struct QProj {
  int64_t bits, group;
  const uint8_t* codes;  // int8: [N, K]; int4: [N, K/2]
  const float* scales;   // [N, K / group]
  const uint8_t* zeros;  // [N, K / group]
};

inline bool supported(int64_t bits, int64_t gs, int64_t K) {
  return gs > 0 && K % gs == 0 && ((bits == 8 && gs % 16 == 0) || (bits == 4 && gs % 32 == 0));
}

inline bool cpu_ok() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// The inputs as the kernels read them: fp32, and for int4 each block of 32 columns
// reordered to its 16 even columns then its 16 odd ones (the nibble order of a byte run).
template <typename T, typename Load>
void prepare_inputs(const T* x, int64_t M, int64_t K, bool reorder, Load ld, std::vector<float>& out) {
  out.resize(size_t(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 32)
      for (int64_t j = 0; j < 32 && k + j < K; ++j) {
        const int64_t src = reorder ? k + (j < 16 ? 2 * j : 2 * (j - 16) + 1) : k + j;
        out[size_t(m * K + k + j)] = ld(x, m * K + src);
      }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")

// 16 codes of row `q` starting at column k (int8 layout) minus the zero point, as fp32.
inline __m512 codes8(const uint8_t* q, __m512i zero) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(v, zero));
}

// NR consecutive weight rows against MM inputs. xs: the inputs as the kernel reads them (for
// int4, each block of 32 reordered even columns first, then odd, to match the nibble order).
// Why several rows at once: one row against one input is a single chain of dependent FMAs
// (4 cycles each); NR * MM independent accumulators keep both FMA units busy, and each
// input vector loaded once serves NR rows. Every (row, input) pair still has its own
// accumulators, summed in the same order whatever NR and MM are, so results do not depend
// on the tiling, the batch or the threads.
template <int BITS, int MM, int NR>
inline void row_tile(const uint8_t* q, int64_t row_bytes, const float* scale, const uint8_t* zero, int64_t K,
                     int64_t gs, const float* xs, float* y, int64_t ldy) {
  __m512 total[NR][MM];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MM; ++m) total[r][m] = _mm512_setzero_ps();
  const int64_t groups = K / gs;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i z[NR];
    __m512 acc[NR][MM];
    for (int r = 0; r < NR; ++r) {
      z[r] = _mm512_set1_epi32(zero[r * groups + g]);
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    const int64_t k0 = g * gs;
    if constexpr (BITS == 8) {
      for (int64_t k = k0; k < k0 + gs; k += 16) {
        __m512 x[MM];
        for (int m = 0; m < MM; ++m) x[m] = _mm512_loadu_ps(xs + m * K + k);
        for (int r = 0; r < NR; ++r) {
          const __m512 w = codes8(q + r * row_bytes + k, z[r]);
          for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(w, x[m], acc[r][m]);
        }
      }
    } else {
      const __m512i mask = _mm512_set1_epi32(0xF);
      for (int64_t k = k0; k < k0 + gs; k += 32) {
        for (int r = 0; r < NR; ++r) {
          const __m512i b =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * row_bytes + k / 2)));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, mask), z[r]));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), z[r]));
          for (int m = 0; m < MM; ++m) {
            acc[r][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xs + m * K + k), acc[r][m]);
            acc[r][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xs + m * K + k + 16), acc[r][m]);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 s = _mm512_set1_ps(scale[r * groups + g]);
      for (int m = 0; m < MM; ++m) total[r][m] = _mm512_fmadd_ps(s, acc[r][m], total[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MM; ++m) y[m * ldy + r] = _mm512_reduce_add_ps(total[r][m]);
}

// Software prefetch of `bytes` of codes from p, one hint per cache line. Why: a row tile is
// only a few KiB, and at the kernels' compute per byte the hardware prefetcher does not run
// far enough ahead when the weights stream from DRAM (measured: int4 rows read 7 GB/s from
// DRAM without it, against 18 GB/s from L3). Hints past the end of the weights are harmless:
// x86 prefetches never fault.
inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}

constexpr int64_t PREFETCH_AHEAD = 8 << 10;  // bytes of codes ahead of the tile being read

// Rows [n0, n1) against M <= 4 inputs, NR rows at a time: y[m * ldy + n] for n in [n0, n1).
template <int BITS, int MM, int NR>
void rows_mm(const uint8_t* qw, const float* scales, const uint8_t* zeros, int64_t K, int64_t gs, const float* xm,
             float* ym, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t row_bytes = BITS == 8 ? K : K / 2, G = K / gs;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const uint8_t* q = qw + n * row_bytes;
    prefetch(q + PREFETCH_AHEAD, NR * row_bytes);
    row_tile<BITS, MM, NR>(q, row_bytes, scales + n * G, zeros + n * G, K, gs, xm, ym + n, ldy);
  }
  for (; n < n1; ++n)
    row_tile<BITS, MM, 1>(qw + n * row_bytes, row_bytes, scales + n * G, zeros + n * G, K, gs, xm, ym + n, ldy);
}

template <int BITS>
void rows(const uint8_t* qw, const float* scales, const uint8_t* zeros, int64_t K, int64_t gs, const float* xs,
          int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t row_bytes = BITS == 8 ? K : K / 2, G = K / gs;
  switch (M) {
    case 1: return rows_mm<BITS, 1, 4>(qw, scales, zeros, K, gs, xs, y, ldy, n0, n1);
    case 2: return rows_mm<BITS, 2, 2>(qw, scales, zeros, K, gs, xs, y, ldy, n0, n1);
    case 3: return rows_mm<BITS, 3, 1>(qw, scales, zeros, K, gs, xs, y, ldy, n0, n1);
    case 4: return rows_mm<BITS, 4, 1>(qw, scales, zeros, K, gs, xs, y, ldy, n0, n1);
  }
  // More than 4 inputs: each row against them 4 at a time, while the row is in L1.
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = qw + n * row_bytes;
    const float* s = scales + n * G;
    const uint8_t* z = zeros + n * G;
    prefetch(q + PREFETCH_AHEAD, row_bytes);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xm = xs + m0 * K;
      float* ym = y + m0 * ldy + n;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: row_tile<BITS, 1, 1>(q, row_bytes, s, z, K, gs, xm, ym, ldy); break;
        case 2: row_tile<BITS, 2, 1>(q, row_bytes, s, z, K, gs, xm, ym, ldy); break;
        case 3: row_tile<BITS, 3, 1>(q, row_bytes, s, z, K, gs, xm, ym, ldy); break;
        default: row_tile<BITS, 4, 1>(q, row_bytes, s, z, K, gs, xm, ym, ldy); break;
      }
    }
  }
}

#pragma GCC pop_options

// Rows [n0, n1) of projection q against the prepared inputs xs [M, K].
inline void qrows(const QProj& q, int64_t K, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0,
                  int64_t n1) {
  if (q.bits == 8) rows<8>(q.codes, q.scales, q.zeros, K, q.group, xs, M, y, ldy, n0, n1);
  else rows<4>(q.codes, q.scales, q.zeros, K, q.group, xs, M, y, ldy, n0, n1);
}

}  // namespace q25q
