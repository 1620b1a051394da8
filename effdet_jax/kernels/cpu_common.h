// Shared pieces of the XLA:CPU custom calls: a parallel loop on XLA's
// intra-op thread pool, and short-vector helpers (GCC vector extensions,
// compiled with -march=native: AVX-512 where the CPU has it).

#ifndef EFFDET_JAX_KERNELS_CPU_COMMON_H_
#define EFFDET_JAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace effdet {

namespace ffi = xla::ffi;

// Reductions split their work into this many chunks whatever the thread
// count, and add the chunk partials in chunk order: results are the same
// bits run to run and machine to machine.
constexpr int64_t kReduceChunks = 16;

struct LoopState {
  std::atomic<int64_t> next{0};
  int64_t chunks = 0;
  std::function<void(int64_t)> body;
  // Participants inside the loop; kClosed is added when the caller is done
  // claiming, after which late tasks return without touching `body`.
  std::atomic<int64_t> active{0};
};

constexpr int64_t kClosed = int64_t{1} << 40;

// Runs body(chunk) for chunk in [0, chunks), on the calling thread and on
// tasks of XLA's pool. Chunks are claimed from a counter, so the caller
// never waits for a task that has not started: two of these loops running
// at once (XLA runs independent thunks concurrently) cannot deadlock the
// pool. The caller spins (briefly: a helper is finishing its last chunk)
// rather than sleeping; a futex wake-up per call cost more than the work
// of small layers.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t chunks,
                        std::function<void(int64_t)> body) {
  auto state = std::make_shared<LoopState>();
  state->chunks = chunks;
  state->body = std::move(body);
  auto participate = [state](bool caller) {
    if (!caller && state->active.fetch_add(1) >= kClosed) {
      state->active.fetch_sub(1);
      return;
    }
    for (int64_t c; (c = state->next.fetch_add(1)) < state->chunks;) {
      state->body(c);
    }
    if (!caller) state->active.fetch_sub(1);
  };
  // EFFDET_KERNEL_THREADS caps the threads (for profiling); read once.
  static const int64_t cap = [] {
    const char* env = std::getenv("EFFDET_KERNEL_THREADS");
    return env ? std::max<int64_t>(std::atoll(env), 1) : int64_t{0};
  }();
  int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  if (cap > 0) threads = cap;
  const int64_t helpers = std::min<int64_t>(threads, chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, participate] { participate(false); });
  }
  participate(true);
  state->active.fetch_add(kClosed);
  for (int spins = 0; state->active.load() != kClosed; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
}

// Chunks for an elementwise loop over `rows` (a few per thread).
inline int64_t LoopChunks(int64_t rows, ffi::ThreadPool& pool) {
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  return std::max<int64_t>(std::min<int64_t>(rows, 4 * threads), 1);
}

// [lo, hi) of chunk `c` of `total` items in `chunks` chunks.
inline int64_t ChunkStart(int64_t total, int64_t chunks, int64_t c) {
  return total * c / chunks;
}

typedef float V16 __attribute__((vector_size(64)));
typedef float V8 __attribute__((vector_size(32)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef int32_t I8 __attribute__((vector_size(32)));

template <typename V>
inline V Load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void Store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
template <typename V>
inline V Splat(float a) {
  return V{} + a;
}

}  // namespace effdet

#endif  // EFFDET_JAX_KERNELS_CPU_COMMON_H_
