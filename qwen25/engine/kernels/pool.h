// A work-sharing thread pool for the decode kernels (see decode.cpp).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>

namespace q25 {

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

}  // namespace q25
