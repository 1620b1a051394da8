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
// Rows are shared out over XLA's intra-op pool (cpu_common.h); the kernel
// gradient adds fixed chunks' partial sums in order (deterministic).

#include <cstdint>
#include <type_traits>
#include <algorithm>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using effdet::Load;
using effdet::Store;
using effdet::V16;
using effdet::V8;

struct Geometry {
  int64_t n, h, w, c;  // input
  int64_t ho, wo;      // output
  int64_t k, stride, pad_top, pad_left;
};

// ---------------------------------------------------------------------------
// Inner loops, templated on the kernel size K (3 and 5 in EfficientDet) so
// the taps unroll and per-tap kernel vectors or accumulators stay in
// registers. Channels go in vectors of 16, then 8, then one at a time.

// Where tap j of output column `op` reads: a valid flag and an input column.
// `along` is the input extent, `pad` the leading padding.
struct Taps {
  std::vector<int64_t> col;  // [out, K], -1 where outside
};

Taps ForwardTaps(int64_t out, int64_t k, int64_t stride, int64_t pad,
                 int64_t along) {
  Taps t;
  t.col.resize(out * k);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t q = o * stride + j - pad;
      t.col[o * k + j] = (q >= 0 && q < along) ? q : -1;
    }
  }
  return t;
}

// For the input gradient: which output column reads input column q at tap j.
Taps InputTaps(int64_t in, int64_t k, int64_t stride, int64_t pad,
               int64_t out) {
  Taps t;
  t.col.resize(in * k);
  for (int64_t q = 0; q < in; ++q) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t u = q + pad - j;
      const bool ok = u >= 0 && u % stride == 0 && u / stride < out;
      t.col[q * k + j] = ok ? u / stride : -1;
    }
  }
  return t;
}

// Per-channel act(y * scale + shift) applied as outputs are stored (the
// inference BN + activation after a depthwise layer); A < 0: none.
struct Epilogue {
  const float* scale = nullptr;
  const float* shift = nullptr;
};

// One output row: y[o, :, cb:cb+L] for every L-block of channels from cb.
// `rows[i]` is the input row read by tap row i (-1 outside).
template <int K, typename V, int L, int A = -1>
int64_t ForwardBlocks(const float* __restrict x, const float* __restrict k,
                      float* __restrict y, const Geometry& g,
                      const int64_t* rows, const Taps& taps, int64_t cb,
                      const Epilogue& epi = Epilogue{}) {
  const int64_t c = g.c;
  for (; cb + L <= c; cb += L) {
    V kr[K * K];
#pragma GCC unroll 32
    for (int t = 0; t < K * K; ++t) kr[t] = Load<V>(k + t * c + cb);
    V sc{}, sh{};
    if constexpr (A >= 0) {
      sc = Load<V>(epi.scale + cb);
      sh = Load<V>(epi.shift + cb);
    }
    for (int64_t op = 0; op < g.wo; ++op) {
      const int64_t* col = &taps.col[op * K];
      V acc = effdet::Splat<V>(0.f);
#pragma GCC unroll 8
      for (int i = 0; i < K; ++i) {
        if (rows[i] < 0) continue;
        const float* xr = x + rows[i] * g.w * c + cb;
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
          if (col[j] < 0) continue;
          acc += Load<V>(xr + col[j] * c) * kr[i * K + j];
        }
      }
      if constexpr (A >= 0) acc = effdet::Activate<A>(acc * sc + sh);
      Store<V>(y + op * c + cb, acc);
    }
  }
  return cb;
}

template <int K, int A = -1>
void ForwardRow(const float* x, const float* k, float* y, const Geometry& g,
                const Taps& taps, int64_t n, int64_t o,
                const Epilogue& epi = Epilogue{}) {
  int64_t rows[K];
  for (int i = 0; i < K; ++i) {
    const int64_t r = o * g.stride + i - g.pad_top;
    rows[i] = (r >= 0 && r < g.h) ? n * g.h + r : -1;
  }
  float* yr = y + (n * g.ho + o) * g.wo * g.c;
  int64_t cb = ForwardBlocks<K, V16, 16, A>(x, k, yr, g, rows, taps, 0, epi);
  cb = ForwardBlocks<K, V8, 8, A>(x, k, yr, g, rows, taps, cb, epi);
  ForwardBlocks<K, float, 1, A>(x, k, yr, g, rows, taps, cb, epi);
}

// dx[r, :, :] for one input row: the taps (i, j) that read input (r, q)
// are those of output (o, o') with r = o*s + i - pad_top, q likewise.
template <int K>
void InputGradRow(const float* dy, const float* k, float* dx,
                  const Geometry& g, const Taps& taps, int64_t n, int64_t r) {
  int64_t rows[K];
  for (int i = 0; i < K; ++i) {
    const int64_t u = r + g.pad_top - i;
    const bool ok = u >= 0 && u % g.stride == 0 && u / g.stride < g.ho;
    rows[i] = ok ? n * g.ho + u / g.stride : -1;
  }
  // Same loop as the forward: the "input" is dy, the output is a dx row.
  Geometry gg = g;
  gg.w = g.wo;
  gg.wo = g.w;
  float* xr = dx + (n * g.h + r) * g.w * g.c;
  int64_t cb = ForwardBlocks<K, V16, 16>(dy, k, xr, gg, rows, taps, 0);
  cb = ForwardBlocks<K, V8, 8>(dy, k, xr, gg, rows, taps, cb);
  ForwardBlocks<K, float, 1>(dy, k, xr, gg, rows, taps, cb);
}

// acc[i, j, cb:cb+L] += sum over one output row of x[tap] * dy, the K*K
// accumulators in registers for the whole row.
template <int K, typename V, int L>
int64_t KernelGradBlocks(const float* __restrict x, const float* __restrict dy,
                         float* __restrict acc_out, const Geometry& g,
                         const int64_t* rows, const Taps& taps, int64_t cb) {
  const int64_t c = g.c;
  for (; cb + L <= c; cb += L) {
    V acc[K * K];
#pragma GCC unroll 32
    for (int t = 0; t < K * K; ++t) acc[t] = effdet::Splat<V>(0.f);
    for (int64_t op = 0; op < g.wo; ++op) {
      const int64_t* col = &taps.col[op * K];
      const V gv = Load<V>(dy + op * c + cb);
#pragma GCC unroll 8
      for (int i = 0; i < K; ++i) {
        if (rows[i] < 0) continue;
        const float* xr = x + rows[i] * g.w * c + cb;
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
          if (col[j] < 0) continue;
          acc[i * K + j] += Load<V>(xr + col[j] * c) * gv;
        }
      }
    }
#pragma GCC unroll 32
    for (int t = 0; t < K * K; ++t) {
      float* p = acc_out + t * c + cb;
      Store<V>(p, Load<V>(p) + acc[t]);
    }
  }
  return cb;
}

template <int K>
void KernelGradRow(const float* x, const float* dy, float* acc,
                   const Geometry& g, const Taps& taps, int64_t n, int64_t o) {
  int64_t rows[K];
  for (int i = 0; i < K; ++i) {
    const int64_t r = o * g.stride + i - g.pad_top;
    rows[i] = (r >= 0 && r < g.h) ? n * g.h + r : -1;
  }
  const float* gr = dy + (n * g.ho + o) * g.wo * g.c;
  int64_t cb = KernelGradBlocks<K, V16, 16>(x, gr, acc, g, rows, taps, 0);
  cb = KernelGradBlocks<K, V8, 8>(x, gr, acc, g, rows, taps, cb);
  KernelGradBlocks<K, float, 1>(x, gr, acc, g, rows, taps, cb);
}

// ---------------------------------------------------------------------------
// FFI entry points.

ffi::Error CheckAttrs(int64_t stride, int64_t pad_top, int64_t pad_left,
                      int64_t k) {
  if (stride < 1 || (k != 3 && k != 5) || pad_top < 0 || pad_left < 0 ||
      pad_top >= k || pad_left >= k) {
    return ffi::Error::InvalidArgument(
        "depthwise kernel: k must be 3 or 5, 0 <= padding < k");
  }
  return ffi::Error::Success();
}

// Geometry from input dims [N,H,W,C], output dims [N,Ho,Wo,C] and attrs.
Geometry MakeGeometry(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out,
                      int64_t k, int64_t stride, int64_t pad_top,
                      int64_t pad_left) {
  return Geometry{in[0], in[1], in[2], in[3],   out[1],
                  out[2], k,    stride, pad_top, pad_left};
}

// f(std::integral_constant<int, K>) for the kernel sizes we compile.
template <typename F>
void WithK(int64_t k, F&& f) {
  if (k == 3) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 5>{});
  }
}

// Runs row(n, r) for every row r < rows of every image n < batch.
template <typename Row>
void ForRows(ffi::ThreadPool& pool, int64_t batch, int64_t rows, Row row) {
  const int64_t total = batch * rows;
  const int64_t chunks = effdet::LoopChunks(total, pool);
  effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t hi = effdet::ChunkStart(total, chunks, chunk + 1);
    for (int64_t t = effdet::ChunkStart(total, chunks, chunk); t < hi; ++t) {
      row(t / rows, t % rows);
    }
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                   int64_t pad_top, int64_t pad_left) {
  const int64_t k = kernel.dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  const Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), k, stride,
                                  pad_top, pad_left);
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  const Taps taps = ForwardTaps(g.wo, k, stride, pad_left, g.w);
  WithK(k, [&](auto K) {
    ForRows(pool, g.n, g.ho, [&](int64_t n, int64_t o) {
      ForwardRow<K()>(xp, kp, yp, g, taps, n, o);
    });
  });
  return ffi::Error::Success();
}

// Forward with the per-channel affine + activation epilogue (inference).
ffi::Error ForwardAffineAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel,
                            ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> shift,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                            int64_t pad_top, int64_t pad_left, int64_t act) {
  const int64_t k = kernel.dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  const Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), k, stride,
                                  pad_top, pad_left);
  if (scale.element_count() != g.c || shift.element_count() != g.c) {
    return ffi::Error::InvalidArgument("depthwise epilogue: one per channel");
  }
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  const Epilogue epi{scale.typed_data(), shift.typed_data()};
  const Taps taps = ForwardTaps(g.wo, k, stride, pad_left, g.w);
  auto run = [&]<int A>() {
    WithK(k, [&](auto K) {
      ForRows(pool, g.n, g.ho, [&](int64_t n, int64_t o) {
        ForwardRow<K(), A>(xp, kp, yp, g, taps, n, o, epi);
      });
    });
  };
  return effdet::WithAct(act, run);
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                     ffi::Buffer<ffi::F32> kernel,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t stride,
                     int64_t pad_top, int64_t pad_left) {
  const int64_t k = kernel.dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  const Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), k, stride,
                                  pad_top, pad_left);
  const float* gp = dy.typed_data();
  const float* kp = kernel.typed_data();
  float* xp = dx->typed_data();
  const Taps taps = InputTaps(g.w, k, stride, pad_left, g.wo);
  WithK(k, [&](auto K) {
    ForRows(pool, g.n, g.h, [&](int64_t n, int64_t r) {
      InputGradRow<K()>(gp, kp, xp, g, taps, n, r);
    });
  });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t stride,
                      int64_t pad_top, int64_t pad_left) {
  const int64_t k = dk->dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  const Geometry g = MakeGeometry(x.dimensions(), dy.dimensions(), k, stride,
                                  pad_top, pad_left);
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  float* out = dk->typed_data();
  const int64_t size = k * k * g.c;
  const Taps taps = ForwardTaps(g.wo, k, stride, pad_left, g.w);
  const int64_t total = g.n * g.ho;
  const int64_t chunks = std::min(total, effdet::kReduceChunks);
  std::vector<float> partial(chunks * size, 0.f);
  WithK(k, [&](auto K) {
    effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
      float* acc = partial.data() + chunk * size;
      const int64_t hi = effdet::ChunkStart(total, chunks, chunk + 1);
      for (int64_t t = effdet::ChunkStart(total, chunks, chunk); t < hi; ++t) {
        KernelGradRow<K()>(xp, gp, acc, g, taps, t / g.ho, t % g.ho);
      }
    });
  });
  std::fill(out, out + size, 0.f);
  for (int64_t c = 0; c < chunks; ++c) {
    const float* p = partial.data() + c * size;
    for (int64_t t = 0; t < size; ++t) out[t] += p[t];
  }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetDepthwiseForwardAffineAct,
                              ForwardAffineAct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("act"));
