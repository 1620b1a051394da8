// Depthwise convolution (NHWC, f32, depth multiplier 1) for XLA:CPU.
//
// XLA:CPU has no fast grouped convolution, and the jnp form (k*k shifted
// multiply-adds, effdet_jax/models/layers.py) makes nine passes over the
// input for the kernel gradient. These three loops read each operand once:
// channels are innermost and contiguous, so the compiler vectorises them.
//
// Geometry: output pixel (o, o') reads input (o*s + i - pad_top,
// o'*s + j - pad_left) for taps (i, j) of a k x k kernel; reads outside the
// input are zero (TF SAME padding, given by the caller).
//
// Work is split into row chunks claimed from an atomic counter by the calling
// thread and by tasks on XLA's intra-op pool. The caller never waits for a
// task that has not started (it claims the chunks itself), so two of these
// calls running at once cannot deadlock the pool.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c;  // input
  int64_t ho, wo;      // output
  int64_t k, stride, pad_top, pad_left;
};

// ---------------------------------------------------------------------------
// Parallel driver.

struct Shared {
  std::atomic<int64_t> next{0};
  int64_t chunks = 0;
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;
  bool closed = false;
};

// Runs body(worker_state, chunk) for every chunk; `finish(worker_state)` once
// per participating thread after its last chunk. `make` builds the state.
template <typename State>
void ParallelChunks(ffi::ThreadPool& pool, int64_t chunks,
                    std::function<State()> make,
                    std::function<void(State&, int64_t)> body,
                    std::function<void(State&)> finish) {
  auto shared = std::make_shared<Shared>();
  shared->chunks = chunks;
  auto participate = [shared, make, body, finish]() {
    {
      std::lock_guard<std::mutex> lock(shared->mu);
      if (shared->closed) return;
      ++shared->active;
    }
    if (shared->next.load() < shared->chunks) {
      State state = make();
      bool any = false;
      for (int64_t c; (c = shared->next.fetch_add(1)) < shared->chunks;) {
        body(state, c);
        any = true;
      }
      if (any) finish(state);
    }
    std::lock_guard<std::mutex> lock(shared->mu);
    --shared->active;
    shared->cv.notify_all();
  };
  int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  int64_t helpers = std::min<int64_t>(threads, chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = participate;
    pool.Schedule(std::move(task));
  }
  participate();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->closed = true;
  shared->cv.wait(lock, [&] { return shared->active == 0; });
}

int64_t ChunkCount(int64_t rows, ffi::ThreadPool& pool) {
  int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  return std::min<int64_t>(rows, 4 * threads);
}

struct Empty {};

// ---------------------------------------------------------------------------
// Inner loops. kBlock channels are accumulated in registers over all taps.

constexpr int64_t kBlock = 16;

// y[n, o, :, :] for one output row.
void ForwardRow(const float* __restrict x, const float* __restrict k,
                float* __restrict y, const Geometry& g, int64_t n,
                int64_t o) {
  const int64_t c = g.c;
  for (int64_t op = 0; op < g.wo; ++op) {
    float* __restrict out = y + ((n * g.ho + o) * g.wo + op) * c;
    int64_t cb = 0;
    for (; cb + kBlock <= c; cb += kBlock) {
      float acc[kBlock] = {};
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t r = o * g.stride + i - g.pad_top;
        if (r < 0 || r >= g.h) continue;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t q = op * g.stride + j - g.pad_left;
          if (q < 0 || q >= g.w) continue;
          const float* __restrict xp = x + ((n * g.h + r) * g.w + q) * c + cb;
          const float* __restrict kp = k + (i * g.k + j) * c + cb;
          for (int64_t t = 0; t < kBlock; ++t) acc[t] += xp[t] * kp[t];
        }
      }
      for (int64_t t = 0; t < kBlock; ++t) out[cb + t] = acc[t];
    }
    if (cb < c) {
      for (int64_t t = cb; t < c; ++t) out[t] = 0.f;
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t r = o * g.stride + i - g.pad_top;
        if (r < 0 || r >= g.h) continue;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t q = op * g.stride + j - g.pad_left;
          if (q < 0 || q >= g.w) continue;
          const float* __restrict xp = x + ((n * g.h + r) * g.w + q) * c;
          const float* __restrict kp = k + (i * g.k + j) * c;
          for (int64_t t = cb; t < c; ++t) out[t] += xp[t] * kp[t];
        }
      }
    }
  }
}

// dx[n, r, :, :] for one input row: the taps that read (r, q) are those with
// r = o*s + i - pad_top for some output row o.
void InputGradRow(const float* __restrict dy, const float* __restrict k,
                  float* __restrict dx, const Geometry& g, int64_t n,
                  int64_t r) {
  const int64_t c = g.c;
  for (int64_t q = 0; q < g.w; ++q) {
    float* __restrict out = dx + ((n * g.h + r) * g.w + q) * c;
    for (int64_t t = 0; t < c; ++t) out[t] = 0.f;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t ro = r + g.pad_top - i;
      if (ro < 0 || ro % g.stride) continue;
      const int64_t o = ro / g.stride;
      if (o >= g.ho) continue;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t qo = q + g.pad_left - j;
        if (qo < 0 || qo % g.stride) continue;
        const int64_t op = qo / g.stride;
        if (op >= g.wo) continue;
        const float* __restrict gp = dy + ((n * g.ho + o) * g.wo + op) * c;
        const float* __restrict kp = k + (i * g.k + j) * c;
        for (int64_t t = 0; t < c; ++t) out[t] += gp[t] * kp[t];
      }
    }
  }
}

// acc[i, j, :] += sum over one output row of x[tap] * dy.
void KernelGradRow(const float* __restrict x, const float* __restrict dy,
                   float* __restrict acc, const Geometry& g, int64_t n,
                   int64_t o) {
  const int64_t c = g.c;
  for (int64_t op = 0; op < g.wo; ++op) {
    const float* __restrict gp = dy + ((n * g.ho + o) * g.wo + op) * c;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t r = o * g.stride + i - g.pad_top;
      if (r < 0 || r >= g.h) continue;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t q = op * g.stride + j - g.pad_left;
        if (q < 0 || q >= g.w) continue;
        const float* __restrict xp = x + ((n * g.h + r) * g.w + q) * c;
        float* __restrict ap = acc + (i * g.k + j) * c;
        for (int64_t t = 0; t < c; ++t) ap[t] += xp[t] * gp[t];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// FFI entry points.

ffi::Error CheckAttrs(int64_t stride, int64_t pad_top, int64_t pad_left,
                      int64_t k) {
  if (stride < 1 || k < 1 || pad_top < 0 || pad_left < 0 || pad_top >= k ||
      pad_left >= k) {
    return ffi::Error::InvalidArgument("bad depthwise geometry");
  }
  return ffi::Error::Success();
}

// Splits `rows` = batch * rows-per-image into chunks of whole rows.
template <typename Row>
void ForRows(ffi::ThreadPool& pool, int64_t batch, int64_t rows, Row row) {
  const int64_t total = batch * rows;
  const int64_t chunks = ChunkCount(total, pool);
  ParallelChunks<Empty>(
      pool, chunks, [] { return Empty{}; },
      [&](Empty&, int64_t chunk) {
        const int64_t lo = total * chunk / chunks;
        const int64_t hi = total * (chunk + 1) / chunks;
        for (int64_t t = lo; t < hi; ++t) row(t / rows, t % rows);
      },
      [](Empty&) {});
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                   int64_t pad_top, int64_t pad_left) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  const int64_t k = kernel.dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1],    yd[2],
             k,     stride, pad_top, pad_left};
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  ForRows(pool, g.n, g.ho,
          [&](int64_t n, int64_t o) { ForwardRow(xp, kp, yp, g, n, o); });
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                     ffi::Buffer<ffi::F32> kernel,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t stride,
                     int64_t pad_top, int64_t pad_left) {
  auto gd = dy.dimensions();
  auto xd = dx->dimensions();
  const int64_t k = kernel.dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], gd[1],    gd[2],
             k,     stride, pad_top, pad_left};
  const float* gp = dy.typed_data();
  const float* kp = kernel.typed_data();
  float* xp = dx->typed_data();
  ForRows(pool, g.n, g.h,
          [&](int64_t n, int64_t r) { InputGradRow(gp, kp, xp, g, n, r); });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t stride,
                      int64_t pad_top, int64_t pad_left) {
  auto xd = x.dimensions();
  auto gd = dy.dimensions();
  const int64_t k = dk->dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], gd[1],    gd[2],
             k,     stride, pad_top, pad_left};
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  float* out = dk->typed_data();
  const int64_t size = k * k * g.c;
  std::fill(out, out + size, 0.f);
  std::mutex mu;
  const int64_t total = g.n * g.ho;
  const int64_t chunks = ChunkCount(total, pool);
  ParallelChunks<std::vector<float>>(
      pool, chunks, [size] { return std::vector<float>(size, 0.f); },
      [&](std::vector<float>& acc, int64_t chunk) {
        const int64_t lo = total * chunk / chunks;
        const int64_t hi = total * (chunk + 1) / chunks;
        for (int64_t t = lo; t < hi; ++t) {
          KernelGradRow(xp, gp, acc.data(), g, t / g.ho, t % g.ho);
        }
      },
      [&](std::vector<float>& acc) {
        std::lock_guard<std::mutex> lock(mu);
        for (int64_t t = 0; t < size; ++t) out[t] += acc[t];
      });
  return ffi::Error::Success();
}

}  // namespace

#define EFFDET_DEPTHWISE_BINDING(name, fn, A, B)   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                   \
      name, fn,                                    \
      ffi::Ffi::Bind()                             \
          .Ctx<ffi::ThreadPool>()                  \
          .Arg<ffi::Buffer<ffi::F32>>()            \
          .Arg<ffi::Buffer<ffi::F32>>()            \
          .Ret<ffi::Buffer<ffi::F32>>()            \
          .Attr<int64_t>("stride")                 \
          .Attr<int64_t>("pad_top")                \
          .Attr<int64_t>("pad_left"));

EFFDET_DEPTHWISE_BINDING(EffdetDepthwiseForward, Forward, x, kernel)
EFFDET_DEPTHWISE_BINDING(EffdetDepthwiseInputGrad, InputGrad, dy, kernel)
EFFDET_DEPTHWISE_BINDING(EffdetDepthwiseKernelGrad, KernelGrad, x, dy)
