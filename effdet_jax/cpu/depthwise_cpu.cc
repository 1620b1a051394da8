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

#include "batch_norm_math.h"
#include "cpu_common.h"
#include "pointwise_rows.h"
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

// One row through the tap table (every tap checked): out[o', cb:cb+L] for
// every L-block of channels from cb. The input gradient's loop, whose
// taps are irregular at stride 2. `rows[i]` is the row read by tap row i
// (-1 outside); `next` (or null) the row that the next output row adds.
template <int K, typename V, int L>
int64_t TapBlocks(const float* __restrict x, const float* __restrict k,
                  float* __restrict y, const Geometry& g, const int64_t* rows,
                  const float* next, const Taps& taps, int64_t cb) {
  const int64_t c = g.c;
  for (; cb + L <= c; cb += L) {
    V kr[K * K];
#pragma GCC unroll 32
    for (int t = 0; t < K * K; ++t) kr[t] = Load<V>(k + t * c + cb);
    for (int64_t op = 0; op < g.wo; ++op) {
      // The row the next output row adds, as in ForwardInterior.
      if (L > 1 && next != nullptr && op < g.w) {
        __builtin_prefetch(next + op * c + cb, 0, 3);
      }
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
      Store<V>(y + op * c + cb, acc);
    }
  }
  return cb;
}

// Output columns [lo, hi) whose K taps all read inside the input row.
struct Interior {
  int64_t lo, hi;
};

Interior InteriorColumns(const Geometry& g) {
  const int64_t s = g.stride, pad = g.pad_left;
  const int64_t lo = std::min((pad + s - 1) / s, g.wo);
  const int64_t last = g.w - g.k + pad;  // op * s <= last
  const int64_t hi = last >= 0 ? std::min(last / s + 1, g.wo) : 0;
  return Interior{lo, std::max(lo, hi)};
}

// The interior of one output row, U outputs at a time: no bounds checks,
// and each input vector loaded once for all the outputs of the group that
// read it ((U - 1) * S + K loads per tap row instead of U * K). `rows[i]`
// points at input row i of the window, or at zeros outside the image.
// `next[q]` (or null) points at the S input rows the next output row adds
// to its window: each group prefetches the part of them under it, so the
// next row's loads hit the cache (measured on [8, 128, 128, 144], k3:
// 23 -> 13.5 ms on one thread; without it most loads of a new row waited
// on memory).
template <int K, int S, int U, typename V, int A>
int64_t ForwardInterior(const float* const* rows, const V* kr, float* y,
                        int64_t c, int64_t pad, int64_t op, int64_t hi,
                        V sc, V sh, const float* const* next) {
  constexpr int NX = (U - 1) * S + K;
  for (; op + U <= hi; op += U) {
    if (next[0] != nullptr) {
#pragma GCC unroll 8
      for (int q = 0; q < S; ++q) {
#pragma GCC unroll 8
        for (int t = 0; t < U * S; ++t) {
          __builtin_prefetch(next[q] + (op * S - pad + t) * c, 0, 3);
        }
      }
    }
    V acc[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) acc[u] = effdet::Splat<V>(0.f);
    const int64_t x0 = (op * S - pad) * c;
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) {
      const float* xb = rows[i] + x0;
      V xv[NX];
#pragma GCC unroll 16
      for (int t = 0; t < NX; ++t) xv[t] = Load<V>(xb + t * c);
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) acc[u] += xv[u * S + j] * kr[i * K + j];
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      V out = acc[u];
      if constexpr (A >= 0) out = effdet::Activate<A>(out * sc + sh);
      Store<V>(y + (op + u) * c, out);
    }
  }
  return op;
}

// One output row of the forward: border columns through the tap table,
// interior columns through ForwardInterior.
// `window[i]` points at input row i of the window (zeros outside).
template <int K, int S, typename V, int L, int A>
int64_t ForwardRowBlocks(const float* const* window,
                         const float* __restrict k, float* __restrict y,
                         const Geometry& g, const float* const* next,
                         const Taps& taps, const Interior& in, int64_t cb,
                         const Epilogue& epi) {
  const int64_t c = g.c;
  constexpr int U = K == 3 ? 4 : 2;
  for (; cb + L <= c; cb += L) {
    V kr[K * K];
#pragma GCC unroll 32
    for (int t = 0; t < K * K; ++t) kr[t] = Load<V>(k + t * c + cb);
    V sc{}, sh{};
    if constexpr (A >= 0) {
      sc = Load<V>(epi.scale + cb);
      sh = Load<V>(epi.shift + cb);
    }
    const float* rp[K];
    for (int i = 0; i < K; ++i) rp[i] = window[i] + cb;
    auto border = [&](int64_t op) {
      const int64_t* col = &taps.col[op * K];
      V acc = effdet::Splat<V>(0.f);
#pragma GCC unroll 8
      for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
          if (col[j] < 0) continue;
          acc += Load<V>(rp[i] + col[j] * c) * kr[i * K + j];
        }
      }
      if constexpr (A >= 0) acc = effdet::Activate<A>(acc * sc + sh);
      Store<V>(y + op * c + cb, acc);
    };
    for (int64_t op = 0; op < in.lo; ++op) border(op);
    const float* nx[S];  // single channels (L == 1) are not prefetched
    for (int q = 0; q < S; ++q) {
      nx[q] = L > 1 && next[0] != nullptr ? next[q] + cb : nullptr;
    }
    int64_t op = ForwardInterior<K, S, U, V, A>(rp, kr, y + cb, c, g.pad_left,
                                                in.lo, in.hi, sc, sh, nx);
    op = ForwardInterior<K, S, 1, V, A>(rp, kr, y + cb, c, g.pad_left, op,
                                        in.hi, sc, sh, nx);
    for (op = in.hi; op < g.wo; ++op) border(op);
  }
  return cb;
}

// The three channel widths of one output row (16, 8, then 1 at a time).
template <int K, int S, int A>
void ForwardRowWindow(const float* const* window, const float* k, float* yr,
                      const Geometry& g, const float* const* next,
                      const Taps& taps, const Interior& in,
                      const Epilogue& epi) {
  int64_t cb = ForwardRowBlocks<K, S, V16, 16, A>(window, k, yr, g, next,
                                                  taps, in, 0, epi);
  cb = ForwardRowBlocks<K, S, V8, 8, A>(window, k, yr, g, next, taps, in, cb,
                                        epi);
  ForwardRowBlocks<K, S, float, 1, A>(window, k, yr, g, next, taps, in, cb,
                                      epi);
}

template <int K, int S, int A = -1>
void ForwardRow(const float* x, const float* k, float* y, const Geometry& g,
                const float* zeros, const Taps& taps, const Interior& in,
                int64_t n, int64_t o, const Epilogue& epi = Epilogue{}) {
  int64_t rows[K];
  const float* window[K];
  for (int i = 0; i < K; ++i) {
    const int64_t r = o * S + i - g.pad_top;
    rows[i] = (r >= 0 && r < g.h) ? n * g.h + r : -1;
    window[i] = rows[i] < 0 ? zeros : x + rows[i] * g.w * g.c;
  }
  // The rows the next output row of this image adds (none past the image).
  const float* next[S];
  const int64_t last = rows[K - 1];
  const bool more = last >= 0 && last + S < (n + 1) * g.h;
  for (int q = 0; q < S; ++q) {
    next[q] = more ? x + (last + 1 + q) * g.w * g.c : nullptr;
  }
  float* yr = y + (n * g.ho + o) * g.wo * g.c;
  ForwardRowWindow<K, S, A>(window, k, yr, g, next, taps, in, epi);
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
  // dx row r + 1 reads dy rows up to (r + 1 + pad_top) / stride.
  const int64_t u_next = (r + 1 + g.pad_top) / g.stride;
  const float* next = r + 1 < g.h && u_next < g.ho
                          ? dy + (n * g.ho + u_next) * g.wo * g.c
                          : nullptr;
  float* xr = dx + (n * g.h + r) * g.w * g.c;
  int64_t cb = TapBlocks<K, V16, 16>(dy, k, xr, gg, rows, next, taps, 0);
  cb = TapBlocks<K, V8, 8>(dy, k, xr, gg, rows, next, taps, cb);
  TapBlocks<K, float, 1>(dy, k, xr, gg, rows, next, taps, cb);
}

// acc[i, j, cb:cb+L] += sum over one output row of x[tap] * dy, the K*K
// accumulators in registers for the whole row. As in the forward: border
// columns through the tap table, interior ones U at a time without checks
// (each input vector loaded once per group), the next output row's new
// input rows and its dy row prefetched. `rows[i]` points at input row i of
// the window (zeros outside the image).
template <int K, int S, typename V, int L>
int64_t KernelGradBlocks(const float* const* rows, const float* __restrict dy,
                         float* __restrict acc_out, const Geometry& g,
                         const float* const* next, const float* next_dy,
                         const Taps& taps, const Interior& in, int64_t cb) {
  const int64_t c = g.c, pad = g.pad_left;
  constexpr int U = K == 3 ? 4 : 1;
  constexpr int NX = (U - 1) * S + K;
  for (; cb + L <= c; cb += L) {
    V acc[K * K];
#pragma GCC unroll 32
    for (int t = 0; t < K * K; ++t) acc[t] = effdet::Splat<V>(0.f);
    auto border = [&](int64_t op) {
      const int64_t* col = &taps.col[op * K];
      const V gv = Load<V>(dy + op * c + cb);
#pragma GCC unroll 8
      for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
          if (col[j] < 0) continue;
          acc[i * K + j] += Load<V>(rows[i] + col[j] * c + cb) * gv;
        }
      }
    };
    for (int64_t op = 0; op < in.lo; ++op) border(op);
    int64_t op = in.lo;
    for (; op + U <= in.hi; op += U) {
      if (L > 1 && next[0] != nullptr) {
#pragma GCC unroll 8
        for (int q = 0; q < S; ++q) {
#pragma GCC unroll 8
          for (int t = 0; t < U * S; ++t) {
            __builtin_prefetch(next[q] + (op * S - pad + t) * c + cb, 0, 3);
          }
        }
      }
      if (L > 1 && next_dy != nullptr) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          __builtin_prefetch(next_dy + (op + u) * c + cb, 0, 3);
        }
      }
      V gv[U];
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) gv[u] = Load<V>(dy + (op + u) * c + cb);
      const int64_t x0 = (op * S - pad) * c + cb;
#pragma GCC unroll 8
      for (int i = 0; i < K; ++i) {
        V xv[NX];
#pragma GCC unroll 16
        for (int t = 0; t < NX; ++t) xv[t] = Load<V>(rows[i] + x0 + t * c);
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) acc[i * K + j] += xv[u * S + j] * gv[u];
        }
      }
    }
    for (; op < in.hi; ++op) border(op);
    for (op = in.hi; op < g.wo; ++op) border(op);
#pragma GCC unroll 32
    for (int t = 0; t < K * K; ++t) {
      float* p = acc_out + t * c + cb;
      Store<V>(p, Load<V>(p) + acc[t]);
    }
  }
  return cb;
}

template <int K, int S>
void KernelGradRow(const float* x, const float* dy, float* acc,
                   const Geometry& g, const float* zeros, const Taps& taps,
                   const Interior& in, int64_t n, int64_t o) {
  const int64_t c = g.c;
  const float* rows[K];
  for (int i = 0; i < K; ++i) {
    const int64_t r = o * S + i - g.pad_top;
    rows[i] = (r >= 0 && r < g.h) ? x + (n * g.h + r) * g.w * c : zeros;
  }
  const int64_t last = o * S + K - 1 - g.pad_top;  // in-image row index
  const bool more = last >= 0 && last + S < g.h;
  const float* next[S];
  for (int q = 0; q < S; ++q) {
    next[q] = more ? x + (n * g.h + last + 1 + q) * g.w * c : nullptr;
  }
  const float* gr = dy + (n * g.ho + o) * g.wo * c;
  const float* next_dy = o + 1 < g.ho ? gr + g.wo * c : nullptr;
  int64_t cb = KernelGradBlocks<K, S, V16, 16>(rows, gr, acc, g, next,
                                               next_dy, taps, in, 0);
  cb = KernelGradBlocks<K, S, V8, 8>(rows, gr, acc, g, next, next_dy, taps,
                                     in, cb);
  KernelGradBlocks<K, S, float, 1>(rows, gr, acc, g, next, next_dy, taps, in,
                                   cb);
}

// ---------------------------------------------------------------------------
// FFI entry points.

ffi::Error CheckAttrs(int64_t stride, int64_t pad_top, int64_t pad_left,
                      int64_t k) {
  // Strides 1 and 2 only: the loops are compiled for those (WithKS).
  if (stride < 1 || stride > 2 || (k != 3 && k != 5) || pad_top < 0 ||
      pad_left < 0 || pad_top >= k || pad_left >= k) {
    return ffi::Error::InvalidArgument(
        "depthwise kernel: stride 1 or 2, k 3 or 5, 0 <= padding < k");
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

// f(std::integral_constant<int, K>, std::integral_constant<int, S>).
template <typename F>
void WithKS(int64_t k, int64_t stride, F&& f) {
  WithK(k, [&](auto K) {
    if (stride == 1) {
      f(K, std::integral_constant<int, 1>{});
    } else {
      f(K, std::integral_constant<int, 2>{});
    }
  });
}

// Channel sums of output row (n, o) into `sums` [C], read back while the
// row is still in cache.
void SumRow(const float* yp, const Geometry& g, int64_t n, int64_t o,
            float* sums) {
  const float* row = yp + (n * g.ho + o) * g.wo * g.c;
  std::fill(sums, sums + g.c, 0.f);
  for (int64_t j = 0; j < g.wo; ++j) {
    effdet::ForChannels(g.c, [&]<typename V>(int64_t cb) {
      Store<V>(sums + cb, Load<V>(sums + cb) + Load<V>(row + j * g.c + cb));
    });
  }
}

// The means `out` [N, C] of the output from its row sums [N, Ho, C], the
// rows added in order, in double: the same bits whatever the thread count.
void PoolRows(const std::vector<float>& row_sums, const Geometry& g,
              float* out) {
  const double pixels = static_cast<double>(g.ho * g.wo);
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t ch = 0; ch < g.c; ++ch) {
      double sum = 0.0;
      for (int64_t o = 0; o < g.ho; ++o) {
        sum += row_sums[(n * g.ho + o) * g.c + ch];
      }
      out[n * g.c + ch] = static_cast<float>(sum / pixels);
    }
  }
}

// The forward over all rows (epilogue A >= 0: act(y * scale + shift));
// with `row_sums` [N, Ho, C], each output row's channel sums too.
template <int A>
ffi::Error RunForward(ffi::ThreadPool& pool, const float* xp, const float* kp,
                      float* yp, const Geometry& g, const Epilogue& epi,
                      float* row_sums = nullptr) {
  const Taps taps = ForwardTaps(g.wo, g.k, g.stride, g.pad_left, g.w);
  const Interior in = InteriorColumns(g);
  const std::vector<float> zeros(g.w * g.c, 0.f);  // rows outside the image
  WithKS(g.k, g.stride, [&](auto K, auto S) {
    ForRows(pool, g.n, g.ho, [&](int64_t n, int64_t o) {
      ForwardRow<K(), S(), A>(xp, kp, yp, g, zeros.data(), taps, in, n, o,
                              epi);
      if (row_sums) SumRow(yp, g, n, o, row_sums + (n * g.ho + o) * g.c);
    });
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                   int64_t pad_top, int64_t pad_left) {
  const int64_t k = kernel.dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  const Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), k, stride,
                                  pad_top, pad_left);
  return RunForward<-1>(pool, x.typed_data(), kernel.typed_data(),
                        y->typed_data(), g, Epilogue{});
}

// The epilogue forwards' geometry, checked: one scale/shift per channel.
ffi::Error AffineGeometry(ffi::Buffer<ffi::F32>& x,
                          ffi::Buffer<ffi::F32>& kernel,
                          ffi::Buffer<ffi::F32>& scale,
                          ffi::Buffer<ffi::F32>& shift,
                          ffi::ResultBuffer<ffi::F32>& y, int64_t stride,
                          int64_t pad_top, int64_t pad_left, Geometry* g) {
  const int64_t k = kernel.dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  *g = MakeGeometry(x.dimensions(), y->dimensions(), k, stride, pad_top,
                    pad_left);
  if (scale.element_count() != g->c || shift.element_count() != g->c) {
    return ffi::Error::InvalidArgument("depthwise epilogue: one per channel");
  }
  return ffi::Error::Success();
}

// RunForward with the epilogue act(y * scale + shift), `act` chosen here.
ffi::Error RunAffineAct(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x,
                        ffi::Buffer<ffi::F32>& kernel,
                        ffi::Buffer<ffi::F32>& scale,
                        ffi::Buffer<ffi::F32>& shift, float* y,
                        const Geometry& g, int64_t act, float* row_sums) {
  const Epilogue epi{scale.typed_data(), shift.typed_data()};
  ffi::Error result = ffi::Error::Success();
  auto dispatch = [&]<int A>() {
    result = RunForward<A>(pool, x.typed_data(), kernel.typed_data(), y, g,
                           epi, row_sums);
  };
  if (auto e = effdet::WithAct(act, dispatch); e.failure()) return e;
  return result;
}

// Forward with the per-channel affine + activation epilogue (inference).
ffi::Error ForwardAffineAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel,
                            ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> shift,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                            int64_t pad_top, int64_t pad_left, int64_t act) {
  Geometry g;
  if (auto e = AffineGeometry(x, kernel, scale, shift, y, stride, pad_top,
                              pad_left, &g);
      e.failure()) {
    return e;
  }
  return RunAffineAct(pool, x, kernel, scale, shift, y->typed_data(), g, act,
                      nullptr);
}

// ForwardAffineAct with squeeze-excitation's squeeze (inference): `pooled`
// [N, C] the output's mean over each image, from row sums taken as each
// output row is written (the separate reduction read the whole output
// again: D0 b8 inference, ~12 ms over the SE blocks).
ffi::Error ForwardAffineActPooled(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> scale,
    ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
    ffi::ResultBuffer<ffi::F32> pooled, int64_t stride, int64_t pad_top,
    int64_t pad_left, int64_t act) {
  Geometry g;
  if (auto e = AffineGeometry(x, kernel, scale, shift, y, stride, pad_top,
                              pad_left, &g);
      e.failure()) {
    return e;
  }
  if (pooled->element_count() != g.n * g.c) {
    return ffi::Error::InvalidArgument("depthwise epilogue: pooled [N, C]");
  }
  std::vector<float> row_sums(g.n * g.ho * g.c);
  if (auto e = RunAffineAct(pool, x, kernel, scale, shift, y->typed_data(), g,
                            act, row_sums.data());
      e.failure()) {
    return e;
  }
  PoolRows(row_sums, g, pooled->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Expand + depthwise (inference). An MBConv block's expand layer (1x1 conv
// + BN + act, pointwise_rows.h) is computed row by row into a ring of K
// rows as the depthwise loop reaches them, so the block's largest tensor
// (D0 b8's first: [8, 256, 256, 96], 201 MB) is never written to memory
// nor read back; a ring of K rows stays in L2.

struct Expand {
  const float* w;      // [cin, cw]: cw a multiple of 16, cw - 16 < C <= cw
  const float* scale;  // [cw]
  const float* shift;  // [cw]
  int64_t cin, cw;
};

// Output rows [t_lo, t_hi) in (image, row) order. Expanded input row r goes
// to slot r % K of the ring when a window first needs it: once per range
// (a range's first window computes its K rows; later windows S new ones).
template <int K, int S, int A>
void ExpandDepthwiseRows(const float* xp, const Expand& e, const float* kp,
                         float* yp, const Geometry& g, const Epilogue& epi,
                         const Taps& taps, const Interior& in,
                         const float* zeros, int64_t t_lo, int64_t t_hi,
                         float* row_sums) {
  const int64_t row = g.w * g.c;
  std::vector<float> ring(K * row);
  const float* const next[S] = {};  // the window's rows are in cache
  int64_t image = -1, done = -1;    // expanded rows of `image` up to `done`
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t n = t / g.ho, o = t % g.ho;
    if (n != image) image = n, done = -1;
    const float* window[K];
    for (int i = 0; i < K; ++i) {
      const int64_t r = o * S + i - g.pad_top;
      if (r < 0 || r >= g.h) {
        window[i] = zeros;
        continue;
      }
      float* slot = ring.data() + (r % K) * row;
      if (r > done) {
        effdet::pointwise::Rows<A, false>(
            xp + (n * g.h + r) * g.w * e.cin, e.w, e.scale, e.shift, slot, 0,
            g.w, e.cin, e.cw, g.c);
        done = r;
      }
      window[i] = slot;
    }
    float* yr = yp + t * g.wo * g.c;
    ForwardRowWindow<K, S, A>(window, kp, yr, g, next, taps, in, epi);
    if (row_sums) SumRow(yp, g, n, o, row_sums + t * g.c);
  }
}

// All output rows in ranges of 8 rows or more (each range recomputes up to
// K - S expanded rows of its first window).
template <int A>
void RunExpandDepthwise(ffi::ThreadPool& pool, const float* xp,
                        const Expand& e, const float* kp, float* yp,
                        const Geometry& g, const Epilogue& epi,
                        float* row_sums) {
  const Taps taps = ForwardTaps(g.wo, g.k, g.stride, g.pad_left, g.w);
  const Interior in = InteriorColumns(g);
  const std::vector<float> zeros(g.w * g.c, 0.f);
  const int64_t total = g.n * g.ho;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(effdet::LoopChunks(total, pool), total / 8));
  WithKS(g.k, g.stride, [&](auto K, auto S) {
    effdet::ParallelFor(pool, chunks, [&](int64_t c) {
      ExpandDepthwiseRows<K(), S(), A>(
          xp, e, kp, yp, g, epi, taps, in, zeros.data(),
          effdet::ChunkStart(total, chunks, c),
          effdet::ChunkStart(total, chunks, c + 1), row_sums);
    });
  });
}

// x [N, H, W, cin], expand w [cin, cw] with its scale/shift [cw], depthwise
// kernel [K, K, C] with its scale/shift [C], y [N, Ho, Wo, C]; one `act`
// for both layers (an MBConv block's). `row_sums` [N, Ho, C] or null.
ffi::Error ExpandDepthwiseImpl(
    ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w,
    ffi::Buffer<ffi::F32>& e_scale, ffi::Buffer<ffi::F32>& e_shift,
    ffi::Buffer<ffi::F32>& kernel, ffi::Buffer<ffi::F32>& scale,
    ffi::Buffer<ffi::F32>& shift, ffi::ResultBuffer<ffi::F32>& y,
    int64_t stride, int64_t pad_top, int64_t pad_left, int64_t act,
    std::vector<float>* row_sums, Geometry* geometry) {
  const int64_t k = kernel.dimensions()[0];
  if (auto e = CheckAttrs(stride, pad_top, pad_left, k); e.failure()) return e;
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 2 || yd.size() != 4 || wd[0] != xd[3] ||
      yd[0] != xd[0] || wd[1] % 16 != 0 || yd[3] > wd[1] ||
      yd[3] <= wd[1] - 16 || e_scale.element_count() != wd[1] ||
      e_shift.element_count() != wd[1] || scale.element_count() != yd[3] ||
      shift.element_count() != yd[3] ||
      kernel.element_count() != k * k * yd[3]) {
    return ffi::Error::InvalidArgument(
        "expand depthwise: x [N,H,W,Cin], w [Cin,Cw] (Cw a multiple of 16, "
        "Cw - 16 < C <= Cw) with scale/shift [Cw], kernel [k,k,C] with "
        "scale/shift [C], y [N,Ho,Wo,C]");
  }
  const Geometry g{xd[0], xd[1],  xd[2],   yd[3],   yd[1],
                   yd[2], k,      stride,  pad_top, pad_left};
  *geometry = g;
  const Expand e{w.typed_data(), e_scale.typed_data(), e_shift.typed_data(),
                 xd[3], wd[1]};
  const Epilogue epi{scale.typed_data(), shift.typed_data()};
  float* sums = nullptr;
  if (row_sums) {
    row_sums->resize(g.n * g.ho * g.c);
    sums = row_sums->data();
  }
  auto run = [&]<int A>() {
    RunExpandDepthwise<A>(pool, x.typed_data(), e, kernel.typed_data(),
                          y->typed_data(), g, epi, sums);
  };
  return effdet::WithAct(act, run);
}

ffi::Error ExpandDepthwiseAffineAct(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
    ffi::Buffer<ffi::F32> e_scale, ffi::Buffer<ffi::F32> e_shift,
    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> scale,
    ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
    int64_t stride, int64_t pad_top, int64_t pad_left, int64_t act) {
  Geometry g;
  return ExpandDepthwiseImpl(pool, x, w, e_scale, e_shift, kernel, scale,
                             shift, y, stride, pad_top, pad_left, act,
                             nullptr, &g);
}

// ExpandDepthwiseAffineAct with SE's squeeze `pooled` [N, C] (as
// ForwardAffineActPooled).
ffi::Error ExpandDepthwiseAffineActPooled(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
    ffi::Buffer<ffi::F32> e_scale, ffi::Buffer<ffi::F32> e_shift,
    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> scale,
    ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
    ffi::ResultBuffer<ffi::F32> pooled, int64_t stride, int64_t pad_top,
    int64_t pad_left, int64_t act) {
  Geometry g;
  std::vector<float> row_sums;
  if (auto e = ExpandDepthwiseImpl(pool, x, w, e_scale, e_shift, kernel,
                                   scale, shift, y, stride, pad_top, pad_left,
                                   act, &row_sums, &g);
      e.failure()) {
    return e;
  }
  if (pooled->element_count() != g.n * g.c) {
    return ffi::Error::InvalidArgument("expand depthwise: pooled [N, C]");
  }
  PoolRows(row_sums, g, pooled->typed_data());
  return ffi::Error::Success();
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
  if (stride == 1) {
    // dx[q] = sum_j dy[q + pad - j] k[j]: the forward over dy with the
    // kernel flipped in both axes and padding k - 1 - pad (its fast path).
    std::vector<float> flipped(k * k * g.c);
    for (int64_t t = 0; t < k * k; ++t) {
      std::copy(kp + t * g.c, kp + (t + 1) * g.c,
                flipped.data() + (k * k - 1 - t) * g.c);
    }
    const Geometry gf = MakeGeometry(dy.dimensions(), dx->dimensions(), k, 1,
                                     k - 1 - pad_top, k - 1 - pad_left);
    return RunForward<-1>(pool, gp, flipped.data(), xp, gf, Epilogue{});
  }
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
  const Interior in = InteriorColumns(g);
  const std::vector<float> zeros(g.w * g.c, 0.f);  // rows outside the image
  const int64_t total = g.n * g.ho;
  const int64_t chunks = std::min(total, effdet::kReduceChunks);
  std::vector<float> partial(chunks * size, 0.f);
  WithKS(k, stride, [&](auto K, auto S) {
    effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
      float* acc = partial.data() + chunk * size;
      const int64_t hi = effdet::ChunkStart(total, chunks, chunk + 1);
      for (int64_t t = effdet::ChunkStart(total, chunks, chunk); t < hi; ++t) {
        KernelGradRow<K(), S()>(xp, gp, acc, g, zeros.data(), taps, in,
                                t / g.ho, t % g.ho);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetDepthwiseForwardAffineActPooled,
                              ForwardAffineActPooled,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // pooled
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("act"));

#define EFFDET_EXPAND_DEPTHWISE_ARGS                    \
  ffi::Ffi::Bind()                                      \
      .Ctx<ffi::ThreadPool>()                           \
      .Arg<ffi::Buffer<ffi::F32>>()  /* x */            \
      .Arg<ffi::Buffer<ffi::F32>>()  /* expand w */     \
      .Arg<ffi::Buffer<ffi::F32>>()  /* expand scale */ \
      .Arg<ffi::Buffer<ffi::F32>>()  /* expand shift */ \
      .Arg<ffi::Buffer<ffi::F32>>()  /* kernel */       \
      .Arg<ffi::Buffer<ffi::F32>>()  /* scale */        \
      .Arg<ffi::Buffer<ffi::F32>>()  /* shift */        \
      .Ret<ffi::Buffer<ffi::F32>>()  /* y */

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetExpandDepthwiseAffineAct,
                              ExpandDepthwiseAffineAct,
                              EFFDET_EXPAND_DEPTHWISE_ARGS
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetExpandDepthwiseAffineActPooled,
                              ExpandDepthwiseAffineActPooled,
                              EFFDET_EXPAND_DEPTHWISE_ARGS
                                  .Ret<ffi::Buffer<ffi::F32>>()  // pooled
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("act"));
