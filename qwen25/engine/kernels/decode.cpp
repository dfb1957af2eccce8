// Fast single-token decode for dense Qwen2 layers on x86 CPUs.
//
// Why this exists: at batch 1 a decode step is 24 layers of matrix-vector products whose
// cost is reading the weights once from DRAM. torch's F.linear streams decode-shaped
// weights well below the memory bandwidth and each of the ~50 torch ops per layer costs
// microseconds of framework overhead. Here one call runs the whole step (all layers, the
// final norm and the lm_head) with GEMV kernels that stream every weight row once
// (AVX-512 BF16 `vdpbf16ps` for bf16 weights, AVX-512 FMA for fp32), spread over the cores
// by a small work-sharing pool (pool.h) that stays fast when other processes share them.
// The hot loops and the rounding helpers are in kernels.h.
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "pool.h"
#include "../../quant/kernels/qlinear.h"  // int8/int4 weight rows (QuantLinear projections)

namespace {

using namespace q25;

// ---- GEMV over several matrices sharing one input --------------------------------------

struct Job {
  const void* W;  // [N, K] row-major, dtype T
  int64_t N;
  float* y;  // output column 0 of this matrix, row stride ldy
  const q25q::QProj* q = nullptr;  // set: W is unused, the rows are int8/int4 codes
};

// The inputs of quantized jobs as their kernels read them (fp32; int4: reordered), made
// once per GEMV call; empty when no job of the call is quantized.
struct QInputs {
  std::vector<float> plain, nibble;
  const float* get(const q25q::QProj& q) const { return q.bits == 4 ? nibble.data() : plain.data(); }
};

struct Chunk {
  int job;
  int64_t n0, n1;
};

// Rows per work item: ~8 items per thread, each between 256 KiB and 1 MiB of weights.
// Long runs keep each thread's reads one linear stream (64 KiB items measured 20% slower
// than 1 MiB ones); enough items even out the threads, also when other processes take
// turns on the cores (a 1.6 MiB o_proj in 1 MiB items left one core idle 40% of it).
inline int64_t chunk_rows(int64_t K, int64_t elsize, int64_t total_rows, int nthreads) {
  const int64_t row = std::max<int64_t>(1, K * elsize);
  const int64_t target = std::clamp<int64_t>(total_rows * row / (8 * std::max(nthreads, 1)), 256 << 10, 1 << 20);
  return std::max<int64_t>(1, target / row);
}

inline std::vector<Chunk> plan(const Job* jobs, int njobs, int64_t K, int64_t elsize, int nthreads) {
  int64_t total = 0;
  for (int j = 0; j < njobs; ++j) total += jobs[j].N;
  const int64_t step = chunk_rows(K, elsize, total, nthreads);
  std::vector<Chunk> chunks;
  for (int j = 0; j < njobs; ++j)
    for (int64_t n0 = 0; n0 < jobs[j].N; n0 += step) chunks.push_back({j, n0, std::min(jobs[j].N, n0 + step)});
  return chunks;
}

// Run the planned work items; post(item, chunk) runs on the same thread right after an
// item's rows are done (while its outputs are still in cache).
template <typename T, typename Post>
void run(const Kernels<T>& kern, const Job* jobs, const std::vector<Chunk>& chunks, const T* x, int64_t M,
         int64_t K, int64_t ldy, int nthreads, Post&& post, const QInputs* qx = nullptr) {
  parallel_for(int64_t(chunks.size()), nthreads, [&](int64_t c, int) {
    const Chunk& ch = chunks[size_t(c)];
    const Job& jb = jobs[ch.job];
    if (jb.q) q25q::qrows(*jb.q, K, qx->get(*jb.q), M, jb.y, ldy, ch.n0, ch.n1);
    else kern.rows(static_cast<const T*>(jb.W), K, x, M, jb.y, ldy, ch.n0, ch.n1);
    post(c, ch);
  });
}

template <typename T>
QInputs quant_inputs(const Job* jobs, int njobs, const T* x, int64_t M, int64_t K) {
  QInputs qx;
  for (int j = 0; j < njobs; ++j) {
    if (!jobs[j].q) continue;
    std::vector<float>& dst = jobs[j].q->bits == 4 ? qx.nibble : qx.plain;
    if (dst.empty()) q25q::prepare_inputs(x, M, K, jobs[j].q->bits == 4, ld<T>, dst);
  }
  return qx;
}

template <typename T>
void gemv(const Kernels<T>& kern, const Job* jobs, int njobs, const T* x, int64_t M, int64_t K,
          int64_t ldy, int nthreads) {
  const QInputs qx = quant_inputs(jobs, njobs, x, M, K);
  run(kern, jobs, plan(jobs, njobs, K, sizeof(T), nthreads), x, M, K, ldy, nthreads, [](int64_t, const Chunk&) {},
      &qx);
}

// ---- the decoder ----------------------------------------------------------------------

// Per layer, in this order (the Python side builds the table): q_proj.weight, q_proj.bias,
// k_proj.weight, k_proj.bias, v_proj.weight, v_proj.bias, o_proj.weight, gate_proj.weight,
// up_proj.weight, down_proj.weight, input_layernorm.weight, post_attention_layernorm.weight.
enum { WQ, BQ, WK, BK, WV, BV, WO, WG, WU, WD, LN1, LN2, PER_LAYER };
// Quantized projections, per layer in this order (codes == nullptr: a dense weight), then
// one entry for the lm_head.
enum { QQ, QK, QV, QO, QG, QU, QD, QUANT_PER_LAYER };

struct Decoder {
  int dtype, isa;
  int64_t n_layers, hidden, inter, n_heads, n_kv, head_dim, vocab;
  float eps;
  std::vector<const void*> w;  // n_layers * PER_LAYER
  const void* norm;
  const void* lm_head;
  std::vector<void*> k_cache, v_cache;  // per layer [slots, n_kv, max_seq, head_dim]
  int64_t slots, max_seq;
  std::vector<q25q::QProj> quant;  // n_layers * QUANT_PER_LAYER + 1 (lm_head), or empty (all dense)

  const q25q::QProj* q(int64_t layer, int which) const {
    if (quant.empty()) return nullptr;
    const q25q::QProj& p = quant[size_t(layer * QUANT_PER_LAYER + which)];
    return p.codes ? &p : nullptr;
  }
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

// logits [M, vocab] = h @ lm_head^T, rounded to T as the model's output is; also, per row,
// the log-sum-exp and the argmax (first index of the maximum, as torch.argmax), computed
// per work item while its logits are in cache and merged in item order (deterministic).
// Doing this here spares the engine two full-vocabulary torch reductions per step.
template <typename T>
void lm_head(const Kernels<T>& kern, const Decoder& D, int64_t M, const T* h, float* logits, float* lse,
             int64_t* argmax, int nthreads) {
  const int64_t V = D.vocab;
  Job head = {D.lm_head, V, logits, D.q(D.n_layers, 0)};
  const QInputs qx = quant_inputs(&head, 1, h, M, D.hidden);
  const std::vector<Chunk> chunks = plan(&head, 1, D.hidden, sizeof(T), nthreads);
  struct Stat { float max; int64_t arg; float sum; };
  std::vector<Stat> stats(chunks.size() * size_t(M));
  run(kern, &head, chunks, h, M, D.hidden, V, nthreads, [&](int64_t c, const Chunk& ch) {
    for (int64_t m = 0; m < M; ++m) {
      float* row = logits + m * V;
      float mx = -INFINITY;
      int64_t arg = ch.n0;
      for (int64_t n = ch.n0; n < ch.n1; ++n) {
        const float v = rnd<T>(row[n]);
        row[n] = v;
        if (v > mx) {
          mx = v;
          arg = n;
        }
      }
      stats[size_t(c * M + m)] = {mx, arg, kern.sumexp(row + ch.n0, ch.n1 - ch.n0, mx)};
    }
  }, &qx);
  for (int64_t m = 0; m < M; ++m) {
    Stat best = {-INFINITY, 0, 0.f};
    for (size_t c = 0; c < chunks.size(); ++c)
      if (stats[c * size_t(M) + size_t(m)].max > best.max) best = stats[c * size_t(M) + size_t(m)];
    float sum = 0.f;
    for (size_t c = 0; c < chunks.size(); ++c) {
      const Stat& s = stats[c * size_t(M) + size_t(m)];
      sum += s.sum * std::exp(s.max - best.max);
    }
    if (lse) lse[m] = best.max + std::log(sum);
    if (argmax) argmax[m] = best.arg;
  }
}

template <typename T>
int step_impl(const Decoder& D, int64_t M, const T* x_in, const T* cos, const T* sin, const int64_t* slot,
              const int64_t* pos, float* logits, float* lse, int64_t* argmax, int nthreads) {
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
    Job qkv_jobs[3] = {{w[WQ], Nq, qkv.data(), D.q(l, QQ)}, {w[WK], Nkv, qkv.data() + Nq, D.q(l, QK)},
                       {w[WV], Nkv, qkv.data() + Nq + Nkv, D.q(l, QV)}};
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
    Job o_job = {w[WO], H, tmp.data(), D.q(l, QO)};
    gemv<T>(kern, &o_job, 1, attn.data(), M, Nq, H, nthreads);
    for (int64_t i = 0; i < M * H; ++i) resid[size_t(i)] = rnd<T>(resid[size_t(i)] + rnd<T>(tmp[size_t(i)]));

    // MLP: norm -> gate, up -> silu(gate) * up -> down
    rmsnorm<T>(resid.data(), static_cast<const T*>(w[LN2]), M, H, D.eps, h.data());
    Job gu_jobs[2] = {{w[WG], I, gu.data(), D.q(l, QG)}, {w[WU], I, gu.data() + I, D.q(l, QU)}};
    gemv<T>(kern, gu_jobs, 2, h.data(), M, H, 2 * I, nthreads);
    for (int64_t m = 0; m < M; ++m) {
      float* gate = gu.data() + m * 2 * I;
      float* up = gate + I;
      for (int64_t i = 0; i < I; ++i) gate[i] = rnd<T>(gate[i]);
      kern.silu(gate, gate, I);
      for (int64_t i = 0; i < I; ++i) st(act.data(), m * I + i, rnd<T>(gate[i]) * rnd<T>(up[i]));
    }
    Job d_job = {w[WD], H, tmp.data(), D.q(l, QD)};
    gemv<T>(kern, &d_job, 1, act.data(), M, I, H, nthreads);
    for (int64_t i = 0; i < M * H; ++i) resid[size_t(i)] = rnd<T>(resid[size_t(i)] + rnd<T>(tmp[size_t(i)]));
  }

  rmsnorm<T>(resid.data(), static_cast<const T*>(D.norm), M, H, D.eps, h.data());
  lm_head<T>(kern, D, M, h.data(), logits, lse, argmax, nthreads);
  return 0;
}

}  // namespace

extern "C" {

// 1 if the CPU runs the AVX-512 kernels for this dtype (0 fp32, 1 bf16), else 0.
int q25_cpu_supports(int dtype) { return dtype == BF16 ? cpu_has_avx512bf16() : cpu_has_avx512f(); }

void* q25_decoder_new(int dtype, int isa, int64_t n_layers, int64_t hidden, int64_t inter, int64_t n_heads,
                      int64_t n_kv, int64_t head_dim, int64_t vocab, float eps, const void* const* layer_weights,
                      const void* norm, const void* lm_head, void* const* k_cache, void* const* v_cache,
                      int64_t slots, int64_t max_seq, const q25q::QProj* quant) {
  if ((dtype != F32 && dtype != BF16) || n_heads % n_kv || head_dim > 512 || head_dim % 2) return nullptr;
  if (isa == AVX512 && !q25_cpu_supports(dtype)) return nullptr;
  if (quant) {  // the int kernels are AVX-512 only; each layout must be one they cover
    if (isa != AVX512 || !q25q::cpu_ok()) return nullptr;
    const int64_t ins[QUANT_PER_LAYER] = {hidden, hidden, hidden, n_heads * head_dim, hidden, hidden, inter};
    for (int64_t i = 0; i <= n_layers * QUANT_PER_LAYER; ++i) {
      const int64_t k = i == n_layers * QUANT_PER_LAYER ? hidden : ins[i % QUANT_PER_LAYER];
      if (quant[i].codes && !q25q::supported(quant[i].bits, quant[i].group, k)) return nullptr;
    }
  }
  auto* D = new Decoder{dtype, isa, n_layers, hidden, inter, n_heads, n_kv, head_dim, vocab, eps,
                        std::vector<const void*>(layer_weights, layer_weights + n_layers * PER_LAYER),
                        norm, lm_head,
                        std::vector<void*>(k_cache, k_cache + n_layers),
                        std::vector<void*>(v_cache, v_cache + n_layers), slots, max_seq, {}};
  if (quant) D->quant.assign(quant, quant + n_layers * QUANT_PER_LAYER + 1);
  return D;
}

void q25_decoder_free(void* dec) { delete static_cast<Decoder*>(dec); }

// One decode step for M sequences: x [M, hidden] embeddings (dtype), cos/sin [M, head_dim]
// (dtype), slot[m] the cache row, pos[m] the position of the new token (= tokens cached
// before it). Writes logits [M, vocab] fp32 (values rounded to the dtype) and, when not
// null, lse [M] (log-sum-exp of each row) and argmax [M]. 0 on success.
int q25_decoder_step(void* dec, int64_t M, const void* x, const void* cos, const void* sin, const int64_t* slot,
                     const int64_t* pos, float* logits, float* lse, int64_t* argmax, int nthreads) {
  const Decoder& D = *static_cast<Decoder*>(dec);
  if (D.dtype == BF16)
    return step_impl<bf16>(D, M, static_cast<const bf16*>(x), static_cast<const bf16*>(cos),
                           static_cast<const bf16*>(sin), slot, pos, logits, lse, argmax, nthreads);
  return step_impl<float>(D, M, static_cast<const float*>(x), static_cast<const float*>(cos),
                          static_cast<const float*>(sin), slot, pos, logits, lse, argmax, nthreads);
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
