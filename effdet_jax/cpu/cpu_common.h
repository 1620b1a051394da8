// Shared pieces of the XLA:CPU custom calls: a parallel loop on XLA's
// intra-op thread pool, and short-vector helpers (GCC vector extensions,
// compiled with -march=native: AVX-512 where the CPU has it).

#ifndef EFFDET_JAX_KERNELS_CPU_COMMON_H_
#define EFFDET_JAX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// The first `lanes` floats at p, the rest zero.
inline V16 LoadLanes(const float* p, int64_t lanes) {
  if (lanes >= 16) return Load<V16>(p);
#if defined(__AVX512F__)
  const __m512 m =
      _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1), p);
  V16 v;
  __builtin_memcpy(&v, &m, sizeof(v));
  return v;
#else
  V16 v = Splat<V16>(0.f);
  __builtin_memcpy(&v, p, lanes * sizeof(float));
  return v;
#endif
}

// The first `count` (< 16) lanes of v: an output narrower than a vector.
inline void StorePartial(float* p, V16 v, int64_t count) {
#if defined(__AVX512F__)
  __m512 m;
  __builtin_memcpy(&m, &v, sizeof(m));
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), m);
#else
  __builtin_memcpy(p, &v, count * sizeof(float));
#endif
}

// Non-temporal stores for outputs larger than the last-level cache: they
// are read back by the next layer from memory anyway, and a plain store
// first reads each line it writes. (AVX-512 builds only; elsewhere plain.)
constexpr int64_t kStreamBytes = int64_t{32} << 20;

inline void StreamStore(float* p, V16 v) {
#if defined(__AVX512F__)
  __m512 m;
  __builtin_memcpy(&m, &v, sizeof(m));
  _mm512_stream_ps(p, m);
#else
  Store<V16>(p, v);
#endif
}

// Orders a thread's streaming stores before it reports its work done.
inline void StreamFence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// exp's core for vectors, x already clamped to [-87, 88] (Cephes expf:
// range reduction by ln 2, degree-5 polynomial): exp(x) = p * 2^n.
template <typename V>
inline V ExpReduced(V x, V* n_out) {
  const V n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  V r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V p = Splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  *n_out = n;
  return p * r * r + r + 1.f;
}

// exp for vectors (ExpReduced, 2^n from the exponent bits; ~1 ulp). NaN
// stays NaN.
template <typename V, typename I>
inline V ExpV(V x) {
  x = x > 88.f ? Splat<V>(88.f) : x;
  x = x < -87.f ? Splat<V>(-87.f) : x;
  V n;
  const V p = ExpReduced(x, &n);
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(V));
  return p * scale;
}


// log for vectors, x in [1, 2] only (Cephes logf: x = 2^k m with m in
// [sqrt(1/2), sqrt(2)), a degree-8 polynomial in m - 1; ~1 ulp).
template <typename V>
inline V LogOneToTwo(V x) {
  const auto high = x > 1.41421356237f;
  const V k = high ? Splat<V>(1.f) : Splat<V>(0.f);
  const V m = (high ? x * 0.5f : x) - 1.f;
  const V z = m * m;
  V p = Splat<V>(7.0376836292e-2f);
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  V y = p * m * z + k * -2.12194440e-4f - 0.5f * z;
  return m + y + k * 0.693359375f;
}


// Activation codes shared by the kernels and their Python wrappers.
enum Act : int64_t { kNone = 0, kSwish = 1, kRelu = 2, kRelu6 = 3 };

#if defined(__AVX512F__)
// ExpV for 16 lanes with AVX-512's own clamps (min/max: one instruction,
// where a compare-and-select is two) and 2^n by `vscalefps` (for the
// integer convert, add and shift): the same bits, ~4 of ~22 instructions
// of a swish fewer, and the activations' passes are bound by arithmetic.
inline V16 Exp(V16 x) {
  __m512 v;
  __builtin_memcpy(&v, &x, sizeof(v));
  // The constant first: min/max return their second operand for a NaN.
  v = _mm512_min_ps(_mm512_set1_ps(88.f), v);
  v = _mm512_max_ps(_mm512_set1_ps(-87.f), v);
  __builtin_memcpy(&x, &v, sizeof(v));
  V16 n;
  const V16 p = ExpReduced(x, &n);
  __m512 pm, nm;
  __builtin_memcpy(&pm, &p, sizeof(pm));
  __builtin_memcpy(&nm, &n, sizeof(nm));
  const __m512 e = _mm512_scalef_ps(pm, nm);
  V16 out;
  __builtin_memcpy(&out, &e, sizeof(out));
  return out;
}
#else
inline V16 Exp(V16 x) { return ExpV<V16, I16>(x); }
#endif
inline V8 Exp(V8 x) { return ExpV<V8, I8>(x); }
inline float Exp(float x) { return std::exp(x); }

template <typename V>
inline V Sigmoid(V z) {
  return 1.f / (1.f + Exp(-z));
}

// 1 / x for x >= 1 (finite): AVX-512's reciprocal estimate (relative error
// < 2^-14) and one Newton step (~1 ulp). A 16-wide division costs ~10x
// its throughput, and the backward kernels, which recompute a sigmoid per
// value, are bound by arithmetic.
inline V16 Recip(V16 x) {
#if defined(__AVX512F__)
  V16 r;
  const __m512 e = _mm512_rcp14_ps(reinterpret_cast<__m512>(x));
  __builtin_memcpy(&r, &e, sizeof(r));
  return r * (2.f - x * r);
#else
  return 1.f / x;
#endif
}
inline V8 Recip(V8 x) { return 1.f / x; }
inline float Recip(float x) { return 1.f / x; }

// Sigmoid with Recip: for gradients (the forward keeps the division).
template <typename V>
inline V SigmoidFast(V z) {
  return Recip(1.f + Exp(-z));
}

template <int A, typename V>
inline V Activate(V z) {
  if constexpr (A == kSwish) return z * Sigmoid(z);
  if constexpr (A == kRelu) return z < 0.f ? Splat<V>(0.f) : z;
  if constexpr (A == kRelu6) {
    z = z < 0.f ? Splat<V>(0.f) : z;
    return z > 6.f ? Splat<V>(6.f) : z;
  }
  return z;
}

// run.template operator()<A>() for the activation code `act`: one
// instantiation per activation, chosen once per call.
template <typename F>
ffi::Error WithAct(int64_t act, F& run) {
  switch (act) {
    case kNone: run.template operator()<kNone>(); break;
    case kSwish: run.template operator()<kSwish>(); break;
    case kRelu: run.template operator()<kRelu>(); break;
    case kRelu6: run.template operator()<kRelu6>(); break;
    default: return ffi::Error::InvalidArgument("unknown activation");
  }
  return ffi::Error::Success();
}

}  // namespace effdet

#endif  // EFFDET_JAX_KERNELS_CPU_COMMON_H_
