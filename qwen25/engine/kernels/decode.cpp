// Fast single-token decode for dense Qwen2 layers on x86 CPUs.
//
// Why this exists: at batch 1 a decode step is 24 layers of matrix-vector products whose
// cost is reading the weights once from DRAM. torch's F.linear streams decode-shaped
// weights well below the memory bandwidth and each of the ~50 torch ops per layer costs
// microseconds of framework overhead. Here one call runs the whole step (all layers, the
// final norm and the lm_head) with GEMV kernels that stream every weight row once
// (AVX-512 BF16 `vdpbf16ps` for bf16 weights, AVX-512 FMA for fp32), spread over the cores
// by a small work-sharing pool (below) that stays fast when other processes share them.
//
// Numerics follow the PyTorch model (qwen25/model/*.py) step by step: every intermediate
// the model materialises in the compute dtype T is rounded to T here at the same point
// (rnd<T>), accumulation is in fp32 like oneDNN/MKL, norms, softmax and SiLU run in fp32.
// Only summation order differs from torch, so results agree to the last bit or two of T.
//
// Plain C ABI (extern "C", raw pointers): built with g++ in about two seconds, loaded with
// ctypes, independent of the torch C++ ABI. The caller keeps every tensor alive and
// contiguous. The AVX-512 code lives in functions compiled for that target only, chosen at
// run time, so the same .so runs (portable path) on CPUs without AVX-512.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

namespace {

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

// ---- a work-sharing pool that never waits for a helper that is not running -----------
//
// OpenMP's fork/join makes every region wait for all threads of the team. When other
// processes hold the cores, a descheduled thread stalls each region for a scheduler time
// slice: measured here, a 0.5B decode step took 970 ms with 2 OpenMP threads and 69 ms
// with 1 while two other processes ran (it is ~22 ms on a quiet machine). Here the caller
// claims work items itself and helpers that happen to be running claim items too; the
// caller only ever waits for an item a helper has already started. Quiet machine: all
// cores work. Busy machine: the caller carries on alone instead of stalling.
//
// The claim word packs (generation 24 bits | item count 20 bits | next item 20 bits), so a
// helper can never claim an item of a job that has moved on, and a successful claim
// proves the job (function, context) is still the current one: the caller rewrites it only
// after all items of the previous job are done.
class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t item, int worker);
  static constexpr int64_t kMaxItems = (1 << 20) - 1;

  // fn(ctx, item, worker) for every item in [0, n); worker 0 is the caller, helpers are
  // 1 .. nthreads - 1. Items must be independent. n <= kMaxItems.
  void run(int64_t n, int nthreads, Fn fn, void* ctx) {
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    if (!lock.owns_lock() || nthreads <= 1 || n <= 1 || n > kMaxItems) {  // busy (another
      for (int64_t i = 0; i < n; ++i) fn(ctx, i, 0);                        // caller): run alone
      return;
    }
    grow(nthreads - 1);
    fn_ = fn;
    ctx_ = ctx;
    allowed_.store(nthreads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xffffff;
    claim_.store((uint64_t(gen_) << 40) | (uint64_t(n) << 20), std::memory_order_release);
    claim_.notify_all();
    int64_t item;
    while ((item = claim(gen_)) >= 0) {
      fn(ctx, item, 0);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
    while (done_.load(std::memory_order_acquire) < n) _mm_pause();  // items helpers started
  }

 private:
  // The next unclaimed item of generation g, or -1 when there is none.
  int64_t claim(uint32_t g) {
    uint64_t cur = claim_.load(std::memory_order_acquire);
    for (;;) {
      int64_t next = int64_t(cur & 0xfffff), n = int64_t((cur >> 20) & 0xfffff);
      if (uint32_t(cur >> 40) != g || next >= n) return -1;
      if (claim_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) return next;
    }
  }

  void helper(int id) {
    uint64_t seen = claim_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t cur = claim_.load(std::memory_order_acquire);
      for (int spin = 0; cur == seen && spin < 20000; ++spin) {  // ~100 us: the next phase
        _mm_pause();                                                // of a step is that close
        cur = claim_.load(std::memory_order_acquire);
      }
      if (cur == seen) {
        claim_.wait(seen, std::memory_order_acquire);
        continue;
      }
      seen = cur;
      if (id > allowed_.load(std::memory_order_relaxed)) continue;
      const uint32_t g = uint32_t(cur >> 40);
      int64_t item;
      while ((item = claim(g)) >= 0) {
        fn_(ctx_, item, id);
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
      seen = claim_.load(std::memory_order_acquire);
    }
  }

  void grow(int helpers) {
    while (int(threads_) < helpers) {
      int id = ++threads_;
      std::thread([this, id] { helper(id); }).detach();
    }
  }

  std::mutex busy_;
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> allowed_{0};
  uint32_t gen_ = 0;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  int threads_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: detached helpers may outlive static teardown
  return *p;
}

// f(item, worker) for item in [0, n) over `nthreads` threads (the caller included).
template <typename F>
void parallel_for(int64_t n, int nthreads, F&& f) {
  using Fn = std::remove_reference_t<F>;
  pool().run(n, nthreads, [](void* ctx, int64_t i, int w) { (*static_cast<Fn*>(ctx))(i, w); }, &f);
}

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

float expsum_portable(float* x, int64_t n, float shift) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - shift));
  return s;
}

void silu_portable(const float* g, float* out, int64_t n) {
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

float expsum_avx512(float* x, int64_t n, float shift) {
  __m512 s = _mm512_setzero_ps(), sh = _mm512_set1_ps(shift);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 mk = tail16(n - i);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, x + i), sh));
    _mm512_mask_storeu_ps(x + i, mk, e);
    s = _mm512_add_ps(s, _mm512_maskz_mov_ps(mk, e));
  }
  return _mm512_reduce_add_ps(s);
}

void silu_avx512(const float* g, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 mk = tail16(n - i);
    __m512 v = _mm512_maskz_loadu_ps(mk, g + i);
    __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)));
    _mm512_mask_storeu_ps(out + i, mk, _mm512_div_ps(v, den));
  }
}

// Sum of p[0 .. n), n a multiple of 64: one linear stream (the bandwidth probe's item).
double read_sum_avx512(const float* p, int64_t n) {
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

bool cpu_has_avx512f() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }
bool cpu_has_avx512bf16() { return cpu_has_avx512f() && __builtin_cpu_supports("avx512bf16"); }

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

// ---- GEMV over several matrices sharing one input --------------------------------------

struct Job {
  const void* W;  // [N, K] row-major, dtype T
  int64_t N;
  float* y;  // output column 0 of this matrix, row stride ldy
};

struct Chunk {
  int job;
  int64_t n0, n1;
};

// Rows per work item: about 1 MiB of weights. Long runs keep each thread's reads one
// linear stream (64 KiB items measured 20% slower); several items per matrix still let
// dynamic scheduling even out cores that other processes share.
inline int64_t chunk_rows(int64_t K, int64_t elsize) {
  return std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, K * elsize));
}

template <typename T>
void gemv(const Kernels<T>& kern, const Job* jobs, int njobs, const T* x, int64_t M, int64_t K,
          int64_t ldy, int nthreads) {
  std::vector<Chunk> chunks;
  int64_t step = chunk_rows(K, sizeof(T));
  for (int j = 0; j < njobs; ++j)
    for (int64_t n0 = 0; n0 < jobs[j].N; n0 += step) chunks.push_back({j, n0, std::min(jobs[j].N, n0 + step)});
  parallel_for(int64_t(chunks.size()), nthreads, [&](int64_t c, int) {
    const Chunk& ch = chunks[size_t(c)];
    const Job& jb = jobs[ch.job];
    kern.rows(static_cast<const T*>(jb.W), K, x, M, jb.y, ldy, ch.n0, ch.n1);
  });
}

// ---- the decoder ----------------------------------------------------------------------

// Per layer, in this order (the Python side builds the table): q_proj.weight, q_proj.bias,
// k_proj.weight, k_proj.bias, v_proj.weight, v_proj.bias, o_proj.weight, gate_proj.weight,
// up_proj.weight, down_proj.weight, input_layernorm.weight, post_attention_layernorm.weight.
enum { WQ, BQ, WK, BK, WV, BV, WO, WG, WU, WD, LN1, LN2, PER_LAYER };

struct Decoder {
  int dtype, isa;
  int64_t n_layers, hidden, inter, n_heads, n_kv, head_dim, vocab;
  float eps;
  std::vector<const void*> w;  // n_layers * PER_LAYER
  const void* norm;
  const void* lm_head;
  std::vector<void*> k_cache, v_cache;  // per layer [slots, n_kv, max_seq, head_dim]
  int64_t slots, max_seq;
};

template <typename T>
void rmsnorm(const float* x, const T* weight, int64_t M, int64_t H, float eps, T* out) {
  // torch: x32 * rsqrt(mean(x32^2) + eps), cast to T, then weight * that (rounded to T).
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * H;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += xm[i] * xm[i];
    float r = 1.f / std::sqrt(ss / float(H) + eps);
    for (int64_t i = 0; i < H; ++i) st(out, m * H + i, ld(weight, i) * rnd<T>(xm[i] * r));
  }
}

// Keys per attention work item. Fixed, so a row's result never depends on the batch or the
// thread count; long contexts still spread over all cores.
constexpr int64_t KV_SPLIT = 512;

// Decode attention for M new tokens: one work item per (row, KV head, 512-key block) covers
// the G query heads sharing that KV head, so each key and value is read once per step.
// Blocks keep (max, sum of exp, unnormalised output) and are merged in a fixed order, as in
// flash-decoding. q [M, Hq, d] fp32; writes out [M, Hq * d] in T (the model rounds SDPA's
// output to the compute dtype).
template <typename T>
void attention(const Kernels<T>& kern, const Decoder& D, int64_t M, const float* q, const T* kc, const T* vc,
               const int64_t* slot, const int64_t* pos, T* out, int nthreads) {
  const int64_t d = D.head_dim, Hkv = D.n_kv, G = D.n_heads / D.n_kv, Nq = D.n_heads * d;
  const float scale = 1.f / std::sqrt(float(d));
  struct Task { int64_t m, j, s; };
  std::vector<Task> tasks;
  std::vector<int64_t> first(size_t(M + 1));  // tasks of row m start at first[m] (per KV head: S_m)
  for (int64_t m = 0; m < M; ++m) {
    first[size_t(m)] = int64_t(tasks.size());
    int64_t S = (pos[m] + 1 + KV_SPLIT - 1) / KV_SPLIT;
    for (int64_t j = 0; j < Hkv; ++j)
      for (int64_t s = 0; s < S; ++s) tasks.push_back({m, j, s});
  }
  first[size_t(M)] = int64_t(tasks.size());
  const int64_t per = G * (d + 2);  // one task's partial result: G x (out[d], max, sum)
  std::vector<float> part(tasks.size() * size_t(per));
  std::vector<float> scratch(size_t(std::max(nthreads, 1)) * size_t(G * KV_SPLIT));
  parallel_for(int64_t(tasks.size()), nthreads, [&](int64_t i, int worker) {
    const Task tk = tasks[size_t(i)];
    const int64_t t0 = tk.s * KV_SPLIT, n = std::min(KV_SPLIT, pos[tk.m] + 1 - t0);
    const int64_t base = ((slot[tk.m] * Hkv + tk.j) * D.max_seq + t0) * d;
    float* sc = scratch.data() + size_t(worker) * size_t(G * KV_SPLIT);
    float* res = part.data() + i * per;
    kern.scores(q + tk.m * Nq + tk.j * G * d, G, kc + base, n, d, scale, sc, KV_SPLIT);
    for (int64_t h = 0; h < G; ++h) {
      float* row = sc + h * KV_SPLIT;
      float mx = row[0];
      for (int64_t t = 1; t < n; ++t) mx = std::max(mx, row[t]);
      res[G * d + 2 * h] = mx;
      res[G * d + 2 * h + 1] = kern.expsum(row, n, mx);
    }
    std::fill(res, res + G * d, 0.f);
    kern.mix(sc, G, KV_SPLIT, vc + base, n, d, res);
  });
  // merge the blocks of each (row, KV head, head): softmax over all keys = rescaled sums
  for (int64_t m = 0; m < M; ++m) {
    const int64_t S = (first[size_t(m + 1)] - first[size_t(m)]) / Hkv;
    for (int64_t j = 0; j < Hkv; ++j)
      for (int64_t h = 0; h < G; ++h) {
        const float* blocks = part.data() + (first[size_t(m)] + j * S) * per;
        float mx = -INFINITY;
        for (int64_t s = 0; s < S; ++s) mx = std::max(mx, blocks[s * per + G * d + 2 * h]);
        float denom = 0.f;
        float acc[512];
        std::fill(acc, acc + d, 0.f);
        for (int64_t s = 0; s < S; ++s) {
          const float* b = blocks + s * per;
          float f = S == 1 ? 1.f : std::exp(b[G * d + 2 * h] - mx);
          denom += f * b[G * d + 2 * h + 1];
          for (int64_t i = 0; i < d; ++i) acc[i] += f * b[h * d + i];
        }
        T* o = out + m * Nq + (j * G + h) * d;
        for (int64_t i = 0; i < d; ++i) st(o, i, acc[i] / denom);
      }
  }
}

template <typename T>
int step_impl(const Decoder& D, int64_t M, const T* x_in, const T* cos, const T* sin, const int64_t* slot,
              const int64_t* pos, float* logits, int nthreads) {
  const Kernels<T> kern = kernels_for<T>(D.isa);
  const int64_t H = D.hidden, I = D.inter, d = D.head_dim, Hq = D.n_heads, Hkv = D.n_kv;
  const int64_t Nq = Hq * d, Nkv = Hkv * d, Nqkv = Nq + 2 * Nkv, half = d / 2;
  for (int64_t m = 0; m < M; ++m)
    if (slot[m] < 0 || slot[m] >= D.slots || pos[m] < 0 || pos[m] >= D.max_seq) return 1;

  std::vector<float> resid(size_t(M * H)), qkv(size_t(M * Nqkv)), gu(size_t(M * 2 * I)), tmp(size_t(M * H));
  std::vector<T> h(size_t(M * H)), attn(size_t(M * Nq)), act(size_t(M * I));
  std::vector<float> q_rot(size_t(M * Nq));
  for (int64_t i = 0; i < M * H; ++i) resid[size_t(i)] = ld(x_in, i);

  for (int64_t l = 0; l < D.n_layers; ++l) {
    const void* const* w = D.w.data() + l * PER_LAYER;
    T* kc = static_cast<T*>(D.k_cache[size_t(l)]);
    T* vc = static_cast<T*>(D.v_cache[size_t(l)]);

    // attention: norm -> q, k, v (+bias) -> RoPE -> cache -> softmax(q k^T) v -> o_proj
    rmsnorm<T>(resid.data(), static_cast<const T*>(w[LN1]), M, H, D.eps, h.data());
    Job qkv_jobs[3] = {{w[WQ], Nq, qkv.data()}, {w[WK], Nkv, qkv.data() + Nq}, {w[WV], Nkv, qkv.data() + Nq + Nkv}};
    gemv<T>(kern, qkv_jobs, 3, h.data(), M, H, Nqkv, nthreads);
    for (int64_t m = 0; m < M; ++m) {
      float* row = qkv.data() + m * Nqkv;
      const T* bias[3] = {static_cast<const T*>(w[BQ]), static_cast<const T*>(w[BK]), static_cast<const T*>(w[BV])};
      for (int64_t i = 0; i < Nq; ++i) row[i] = rnd<T>(row[i] + ld(bias[0], i));
      for (int64_t i = 0; i < Nkv; ++i) row[Nq + i] = rnd<T>(row[Nq + i] + ld(bias[1], i));
      for (int64_t i = 0; i < Nkv; ++i) row[Nq + Nkv + i] = rnd<T>(row[Nq + Nkv + i] + ld(bias[2], i));
      // RoPE, half-split layout: x * cos + rotate_half(x) * sin, each product rounded to T.
      const T* c = cos + m * d;
      const T* s = sin + m * d;
      auto rope = [&](const float* src, float* dst) {
        for (int64_t i = 0; i < d; ++i) {
          float rot = i < half ? -src[i + half] : src[i - half];
          dst[i] = rnd<T>(rnd<T>(src[i] * ld(c, i)) + rnd<T>(rot * ld(s, i)));
        }
      };
      for (int64_t hq = 0; hq < Hq; ++hq) rope(row + hq * d, q_rot.data() + m * Nq + hq * d);
      float krot[512];
      for (int64_t j = 0; j < Hkv; ++j) {
        rope(row + Nq + j * d, krot);
        int64_t off = ((slot[m] * Hkv + j) * D.max_seq + pos[m]) * d;
        for (int64_t i = 0; i < d; ++i) {
          st(kc, off + i, krot[i]);
          st(vc, off + i, row[Nq + Nkv + j * d + i]);
        }
      }
    }
    attention<T>(kern, D, M, q_rot.data(), kc, vc, slot, pos, attn.data(), nthreads);
    Job o_job = {w[WO], H, tmp.data()};
    gemv<T>(kern, &o_job, 1, attn.data(), M, Nq, H, nthreads);
    for (int64_t i = 0; i < M * H; ++i) resid[size_t(i)] = rnd<T>(resid[size_t(i)] + rnd<T>(tmp[size_t(i)]));

    // MLP: norm -> gate, up -> silu(gate) * up -> down
    rmsnorm<T>(resid.data(), static_cast<const T*>(w[LN2]), M, H, D.eps, h.data());
    Job gu_jobs[2] = {{w[WG], I, gu.data()}, {w[WU], I, gu.data() + I}};
    gemv<T>(kern, gu_jobs, 2, h.data(), M, H, 2 * I, nthreads);
    for (int64_t m = 0; m < M; ++m) {
      float* gate = gu.data() + m * 2 * I;
      float* up = gate + I;
      for (int64_t i = 0; i < I; ++i) gate[i] = rnd<T>(gate[i]);
      kern.silu(gate, gate, I);
      for (int64_t i = 0; i < I; ++i) st(act.data(), m * I + i, rnd<T>(gate[i]) * rnd<T>(up[i]));
    }
    Job d_job = {w[WD], H, tmp.data()};
    gemv<T>(kern, &d_job, 1, act.data(), M, I, H, nthreads);
    for (int64_t i = 0; i < M * H; ++i) resid[size_t(i)] = rnd<T>(resid[size_t(i)] + rnd<T>(tmp[size_t(i)]));
  }

  rmsnorm<T>(resid.data(), static_cast<const T*>(D.norm), M, H, D.eps, h.data());
  Job head = {D.lm_head, D.vocab, logits};
  gemv<T>(kern, &head, 1, h.data(), M, H, D.vocab, nthreads);
  for (int64_t i = 0; i < M * D.vocab; ++i) logits[i] = rnd<T>(logits[i]);
  return 0;
}

}  // namespace

extern "C" {

// 1 if the CPU runs the AVX-512 kernels for this dtype (0 fp32, 1 bf16), else 0.
int q25_cpu_supports(int dtype) { return dtype == BF16 ? cpu_has_avx512bf16() : cpu_has_avx512f(); }

void* q25_decoder_new(int dtype, int isa, int64_t n_layers, int64_t hidden, int64_t inter, int64_t n_heads,
                      int64_t n_kv, int64_t head_dim, int64_t vocab, float eps, const void* const* layer_weights,
                      const void* norm, const void* lm_head, void* const* k_cache, void* const* v_cache,
                      int64_t slots, int64_t max_seq) {
  if ((dtype != F32 && dtype != BF16) || n_heads % n_kv || head_dim > 512 || head_dim % 2) return nullptr;
  if (isa == AVX512 && !q25_cpu_supports(dtype)) return nullptr;
  auto* D = new Decoder{dtype, isa, n_layers, hidden, inter, n_heads, n_kv, head_dim, vocab, eps,
                        std::vector<const void*>(layer_weights, layer_weights + n_layers * PER_LAYER),
                        norm, lm_head,
                        std::vector<void*>(k_cache, k_cache + n_layers),
                        std::vector<void*>(v_cache, v_cache + n_layers), slots, max_seq};
  return D;
}

void q25_decoder_free(void* dec) { delete static_cast<Decoder*>(dec); }

// One decode step for M sequences: x [M, hidden] embeddings (dtype), cos/sin [M, head_dim]
// (dtype), slot[m] the cache row, pos[m] the position of the new token (= tokens cached
// before it). Writes logits [M, vocab] fp32 (values rounded to the dtype). 0 on success.
int q25_decoder_step(void* dec, int64_t M, const void* x, const void* cos, const void* sin, const int64_t* slot,
                     const int64_t* pos, float* logits, int nthreads) {
  const Decoder& D = *static_cast<Decoder*>(dec);
  if (D.dtype == BF16)
    return step_impl<bf16>(D, M, static_cast<const bf16*>(x), static_cast<const bf16*>(cos),
                           static_cast<const bf16*>(sin), slot, pos, logits, nthreads);
  return step_impl<float>(D, M, static_cast<const float*>(x), static_cast<const float*>(cos),
                          static_cast<const float*>(sin), slot, pos, logits, nthreads);
}

// y [M, N] fp32 = x [M, K] @ W[N, K]^T with the chosen kernels (for tests and benchmarks).
int q25_linear(int dtype, int isa, const void* x, const void* W, int64_t M, int64_t K, int64_t N, float* y,
               int nthreads) {
  if (isa == AVX512 && !q25_cpu_supports(dtype)) return 1;
  Job job = {W, N, y};
  if (dtype == BF16) gemv<bf16>(kernels_for<bf16>(isa), &job, 1, static_cast<const bf16*>(x), M, K, N, nthreads);
  else gemv<float>(kernels_for<float>(isa), &job, 1, static_cast<const float*>(x), M, K, N, nthreads);
  return 0;
}

// Sum of n floats (n a multiple of 64) read once by `nthreads` threads, each streaming
// contiguous 4 MiB pieces: measures the memory read bandwidth.
double q25_read_sum(const float* p, int64_t n, int nthreads) {
  const int64_t piece = 1 << 20, items = (n + piece - 1) / piece;
  std::vector<double> part(size_t(items), 0.0);
  const bool fast = cpu_has_avx512f();
  parallel_for(items, nthreads, [&](int64_t i, int) {
    const int64_t lo = i * piece, len = std::min(piece, n - lo);
    if (fast) {
      part[size_t(i)] = read_sum_avx512(p + lo, len);
    } else {
      double s = 0;
      for (int64_t j = 0; j < len; ++j) s += p[lo + j];
      part[size_t(i)] = s;
    }
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

}  // extern "C"
