// A 1x1 convolution over few input channels with the inference BN and
// activation after it, for XLA:CPU: y = act((x @ w) * scale + shift).
//
// EfficientNet's expand layers at the high resolutions contract only
// 16-40 input channels into 96-240. XLA:CPU's dot for those shapes ran at
// a quarter of the memory bandwidth (the D0 b8 `[524288, 16] x [16, 96]`:
// 28 ms), and the BN + swish after it is a second pass over the largest
// tensor of the network (20 ms); here both are one pass that writes the
// output once. Rows are shared out over XLA's intra-op pool; each group of
// R rows keeps R accumulators per 16 output channels, the weights' column
// block read from L1 once per group.

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "batch_norm_math.h"
#include "cpu_common.h"
#include "pointwise_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using effdet::Load;
using effdet::Splat;
using effdet::Store;
using effdet::StorePartial;
using effdet::StreamFence;
using effdet::StreamStore;
using effdet::kStreamBytes;
using effdet::V16;
using effdet::pointwise::Group;
using effdet::pointwise::kRows;
using effdet::pointwise::Rows;
using effdet::pointwise::StoreOut;

constexpr int64_t kMaxIn = 64;   // input channels handled here
// ... and by the inference `PointwiseAffineAct`, which keeps no per-row
// buffer: up to EfficientNet's widest expand inputs at D0-D7 (192-384 in
// the late blocks; measured against XLA's dot + its epilogue pass at D0 b8:
// 8192 x 80 -> 480 4.40 -> 3.72 ms, 2048 x 192 -> 1152 5.48 -> 4.57 ms).
constexpr int64_t kMaxInAffine = 512;

// The inference epilogue's operands: weights n wide (a multiple of 16),
// one scale/shift per weight column, an output ny wide with n - 16 < ny <= n.
bool EpilogueShapesOk(int64_t n, int64_t ny, ffi::Buffer<ffi::F32>& scale,
                      ffi::Buffer<ffi::F32>& shift) {
  return n % 16 == 0 && scale.element_count() == n &&
         shift.element_count() == n && ny <= n && ny > n - 16;
}

// Streaming stores for a whole-block output over kStreamBytes, 64-aligned.
bool UseStream(int64_t m, int64_t n, int64_t ny, const float* y) {
  return ny == n && m * n * 4 >= kStreamBytes &&
         reinterpret_cast<uintptr_t>(y) % 64 == 0;
}

// rows(lo, hi) over chunks of whole kRows groups of [0, m), a few per
// thread; a chunk that streamed fences its stores before the join.
template <typename F>
void ForRowGroups(ffi::ThreadPool& pool, int64_t m, bool stream, F rows) {
  const int64_t groups = (m + kRows - 1) / kRows;
  const int64_t chunks = effdet::LoopChunks(groups, pool);
  effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t lo = effdet::ChunkStart(groups, chunks, chunk) * kRows;
    const int64_t hi =
        std::min(effdet::ChunkStart(groups, chunks, chunk + 1) * kRows, m);
    rows(lo, hi);
    if (stream) StreamFence();
  });
}

ffi::Error PointwiseAffineAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> w,
                              ffi::Buffer<ffi::F32> scale,
                              ffi::Buffer<ffi::F32> shift,
                              ffi::ResultBuffer<ffi::F32> y, int64_t act) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("pointwise: x [M, K], w [K, N]");
  }
  const int64_t m = xd[0], k = wd[0], n = wd[1];
  // y [M, ny]: the weights' columns past ny are padding (ny > n - 16).
  auto yd = y->dimensions();
  const int64_t ny = yd.size() == 2 ? yd[1] : -1;
  if (k > kMaxInAffine || yd.size() != 2 || yd[0] != m ||
      !EpilogueShapesOk(n, ny, scale, shift)) {
    return ffi::Error::InvalidArgument(
        "pointwise: N a multiple of 16, K <= 512, one scale/shift per N, "
        "y [M, N'] with N - 16 < N' <= N");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float* sp = scale.typed_data();
  const float* hp = shift.typed_data();
  float* yp = y->typed_data();
  const bool stream = UseStream(m, n, ny, yp);
  auto run = [&]<int A>() {
    ForRowGroups(pool, m, stream, [&](int64_t lo, int64_t hi) {
      if (stream) {
        Rows<A, true>(xp, wp, sp, hp, yp, lo, hi, k, n, ny);
      } else {
        Rows<A, false>(xp, wp, sp, hp, yp, lo, hi, k, n, ny);
      }
    });
  };
  return effdet::WithAct(act, run);
}

// A k x k conv over few channels (the stem: 3x3 / 2 over RGB) with its
// inference BN + activation, from the padded image: each group of output
// pixels gathers its patches ([R, kh*kw*C], tap-major, channel-minor: the
// order of `layers.conv_im2col`) into a buffer in L1 and runs Group on it,
// so the patch matrix (9x the image) is never written to memory.
struct Window {
  int64_t hp, wp, c;     // padded input [B, hp, wp, c]
  int64_t ho, wo;        // output pixels per image
  int64_t kh, kw, s;     // window and stride
};

// R consecutive output pixels of one output row, straight from the padded
// image: pixel r's patch row i is the `run` floats at src + i * img_row +
// r * step. Group's arithmetic and stores, with no patch buffer.
template <int R, int A, bool Stream>
inline void WindowGroup(const float* __restrict src, int64_t step,
                        int64_t img_row, int64_t kh, int64_t run,
                        const float* __restrict w,
                        const float* __restrict scale,
                        const float* __restrict shift, float* __restrict y,
                        int64_t n, int64_t ny) {
  for (int64_t nb = 0; nb < n; nb += 16) {
    V16 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = Splat<V16>(0.f);
    for (int64_t i = 0; i < kh; ++i) {
      const float* xi = src + i * img_row;
      const float* wi = w + i * run * n + nb;
      for (int64_t t = 0; t < run; ++t) {
        const V16 wv = Load<V16>(wi + t * n);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] += xi[r * step + t] * wv;
      }
    }
    const V16 sc = Load<V16>(scale + nb), sh = Load<V16>(shift + nb);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      StoreOut<Stream>(y + r * ny + nb, effdet::Activate<A>(acc[r] * sc + sh),
                       ny - nb);
    }
  }
}

// n (<= 64) floats, in masked 16-lane vectors: the runs are short (9 for
// the stem), where a memmove call per run cost more than the conv.
inline void CopyShort(const float* __restrict src, float* __restrict dst,
                      int64_t n) {
#if defined(__AVX512F__)
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t m = std::min<int64_t>(16, n - t);
    const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1);
    _mm512_mask_storeu_ps(dst + t, mask, _mm512_maskz_loadu_ps(mask, src + t));
  }
#else
  for (int64_t t = 0; t < n; ++t) dst[t] = src[t];
#endif
}

inline void GatherPatches(const float* __restrict xp, const Window& g,
                          int64_t row, int64_t rows, float* __restrict buf) {
  const int64_t k = g.kh * g.kw * g.c, run = g.kw * g.c;
  const int64_t per_image = g.ho * g.wo;
  int64_t b = row / per_image, oy = row % per_image / g.wo,
          ox = row % per_image % g.wo;
  for (int64_t r = 0; r < rows; ++r) {
    // kw taps x c channels are contiguous in a row of the image.
    const float* src = xp + ((b * g.hp + g.s * oy) * g.wp + g.s * ox) * g.c;
    for (int64_t i = 0; i < g.kh; ++i) {
      CopyShort(src + i * g.wp * g.c, buf + r * k + i * run, run);
    }
    if (++ox == g.wo) {
      ox = 0;
      if (++oy == g.ho) oy = 0, ++b;
    }
  }
}

ffi::Error Im2colAffineAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> shift,
                           ffi::ResultBuffer<ffi::F32> y, int64_t act,
                           int64_t kh, int64_t kw, int64_t stride) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 2 || yd.size() != 4 || kh < 1 ||
      kw < 1 || stride < 1 || wd[0] != kh * kw * xd[3] || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument(
        "im2col: x [B, H, W, C], w [kh*kw*C, N], y [B, H', W', N']");
  }
  const Window g{xd[1], xd[2], xd[3], yd[1], yd[2], kh, kw, stride};
  const int64_t m = yd[0] * g.ho * g.wo, k = wd[0], n = wd[1], ny = yd[3];
  if (k > kMaxIn || !EpilogueShapesOk(n, ny, scale, shift) ||
      g.s * (g.ho - 1) + kh > g.hp || g.s * (g.wo - 1) + kw > g.wp) {
    return ffi::Error::InvalidArgument(
        "im2col: N a multiple of 16, kh*kw*C <= 64, one scale/shift per N, "
        "N - 16 < N' <= N, windows inside x");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float* sp = scale.typed_data();
  const float* hp = shift.typed_data();
  float* yp = y->typed_data();
  const bool stream = UseStream(m, n, ny, yp);
  auto run = [&]<int A>() {
    ForRowGroups(pool, m, stream, [&](int64_t lo, int64_t hi) {
      // Groups within one output row read the image directly; one that
      // wraps to the next row (or image) and the tail rows gather their
      // patches into `buf` first.
      alignas(64) float buf[kRows * kMaxIn];
      const int64_t per_image = g.ho * g.wo, step = g.s * g.c;
      const int64_t img_row = g.wp * g.c, run = g.kw * g.c;
      auto rows_at = [&]<int R, bool S>(int64_t r) {
        const int64_t b = r / per_image, o = r % per_image;
        const int64_t oy = o / g.wo, ox = o % g.wo;
        if (ox + R <= g.wo) {
          const float* src = xp + ((b * g.hp + g.s * oy) * g.wp + g.s * ox) * g.c;
          WindowGroup<R, A, S>(src, step, img_row, g.kh, run, wp, sp, hp,
                               yp + r * ny, n, ny);
        } else {
          GatherPatches(xp, g, r, R, buf);
          Group<R, A, S>(buf, wp, sp, hp, yp + r * ny, k, n, ny);
        }
      };
      int64_t r = lo;
      for (; r + kRows <= hi; r += kRows) {
        if (stream) {
          rows_at.template operator()<kRows, true>(r);
        } else {
          rows_at.template operator()<kRows, false>(r);
        }
      }
      for (; r < hi; ++r) {
        if (stream) {
          rows_at.template operator()<1, true>(r);
        } else {
          rows_at.template operator()<1, false>(r);
        }
      }
    });
  };
  return effdet::WithAct(act, run);
}

// ---------------------------------------------------------------------------
// Training: the expand conv with the BN + activation after it.
//
// Forward: y = x @ w, written once, with BN's batch statistics of y summed
// from the accumulators as they are stored (BN's own pass over y to sum it
// is not needed); then z = act(BN(y)). Backward: after BN's reductions over
// (y, dz), each group of rows recomputes BN's input gradient dy in
// registers and contracts it at once into dx = dy w^T and dw = x^T dy: dy,
// the largest tensor of the backward, is never written nor read back (XLA
// read it once per product). Sums are in fixed chunks, flushed from f32 into
// double every kFlushGroups groups, added in chunk order: deterministic.

constexpr int64_t kFlushGroups = 16;
constexpr int64_t kPrefetchGroups = 2;  // how far ahead BackGroup prefetches

// Fixed chunks of whole row groups for the loops that reduce.
struct GroupChunks {
  int64_t m, groups, chunks;
  explicit GroupChunks(int64_t rows)
      : m(rows),
        groups((rows + kRows - 1) / kRows),
        chunks(std::max<int64_t>(
            std::min<int64_t>(groups, effdet::kReduceChunks), 1)) {}
  // First row of group g (m past the last group).
  int64_t Row(int64_t g) const { return std::min(g * kRows, m); }
  int64_t First(int64_t chunk) const {
    return effdet::ChunkStart(groups, chunks, chunk);
  }
};

template <int A>
void BnForwardImpl(ffi::ThreadPool& pool, const float* x, const float* w,
                   const float* scale, const float* bias, float eps,
                   int64_t m, int64_t k, int64_t n, float* y, float* z,
                   float* mean, float* var) {
  const GroupChunks gc(m);
  std::vector<double> p1(gc.chunks * n, 0.0), p2(gc.chunks * n, 0.0);
  const bool stream = m * n * 4 >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(y) % 64 == 0;
  effdet::ParallelFor(pool, gc.chunks, [&](int64_t chunk) {
    std::vector<float> b1(n), b2(n);
    double* d1 = p1.data() + chunk * n;
    double* d2 = p2.data() + chunk * n;
    const int64_t g_hi = gc.First(chunk + 1);
    for (int64_t g0 = gc.First(chunk); g0 < g_hi; g0 += kFlushGroups) {
      std::fill(b1.begin(), b1.end(), 0.f);
      std::fill(b2.begin(), b2.end(), 0.f);
      const int64_t lo = gc.Row(g0), hi = gc.Row(std::min(g_hi, g0 + kFlushGroups));
      if (stream) {
        Rows<effdet::kNone, true, true>(x, w, nullptr, nullptr, y, lo, hi, k,
                                        n, n, b1.data(), b2.data());
      } else {
        Rows<effdet::kNone, false, true>(x, w, nullptr, nullptr, y, lo, hi, k,
                                         n, n, b1.data(), b2.data());
      }
      for (int64_t t = 0; t < n; ++t) {
        d1[t] += b1[t];
        d2[t] += b2[t];
      }
    }
    if (stream) StreamFence();
  });
  std::vector<double> s1(n, 0.0), s2(n, 0.0);
  for (int64_t c = 0; c < gc.chunks; ++c) {
    for (int64_t t = 0; t < n; ++t) {
      s1[t] += p1[c * n + t];
      s2[t] += p2[c * n + t];
    }
  }
  std::vector<float> mul(n);
  effdet::Moments(s1, s2, m, scale, eps, mean, var, mul.data());
  effdet::ForEachRow(pool, m, [&](int64_t r) {
    effdet::NormalizeRow<A>(y + r * n, mean, mul.data(), bias, n, z + r * n);
  });
}

// BN's per-channel inputs to its input gradient.
struct BnArgs {
  const float *scale, *bias, *mean, *rstd;
  const effdet::BnGrad* g;
};

// R rows of the backward: dy (BN's input gradient) into the scratch `dyb`
// and into the kernel gradient `dw` (f32, [K, N]); then dx = dy w^T, with
// `wt` = w^T, each row zero-padded to kp (a multiple of 16) channels.
template <int A, int R>
inline void BackGroup(const float* __restrict x, const float* __restrict wt,
                      const float* __restrict y, const float* __restrict dz,
                      const BnArgs& bn, float* __restrict dyb,
                      float* __restrict dw, float* __restrict dx, int64_t k,
                      int64_t kp, int64_t n) {
  // The next groups' rows of y and dz: the loads below otherwise wait on
  // memory (perf: most of this loop's time), two streams the hardware
  // prefetcher did not keep ahead of. (A prefetch past the end is a no-op.)
  const int64_t ahead = kPrefetchGroups * R * n;
  for (int64_t i = 0; i < R * n; i += 16) {
    __builtin_prefetch(y + ahead + i);
    __builtin_prefetch(dz + ahead + i);
  }
  for (int64_t nb = 0; nb < n; nb += 16) {
    const effdet::BnGradConsts<V16> bc(bn.scale, bn.bias, bn.mean, bn.rstd,
                                       *bn.g, nb);
    V16 d[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      d[r] = bc.template operator()<A>(Load<V16>(y + r * n + nb),
                                       Load<V16>(dz + r * n + nb));
      Store<V16>(dyb + r * n + nb, d[r]);
    }
    for (int64_t c = 0; c < k; ++c) {
      V16 a = Load<V16>(dw + c * n + nb);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a += x[r * k + c] * d[r];
      Store<V16>(dw + c * n + nb, a);
    }
  }
  for (int64_t kb = 0; kb < kp; kb += 16) {
    V16 a[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] = Splat<V16>(0.f);
    for (int64_t j = 0; j < n; ++j) {
      const V16 wv = Load<V16>(wt + j * kp + kb);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r] += dyb[r * n + j] * wv;
    }
    const int64_t len = std::min<int64_t>(16, k - kb);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __builtin_memcpy(dx + r * k + kb, &a[r], len * sizeof(float));
    }
  }
}

template <int A>
void BnBackwardImpl(ffi::ThreadPool& pool, const float* x, const float* w,
                    const float* y, const float* dz, const float* scale,
                    const float* bias, const float* mean, const float* rstd,
                    int64_t m, int64_t k, int64_t n, float* dx, float* dw,
                    float* dscale, float* dbias) {
  const effdet::BnGrad g = effdet::BackwardSums<A>(
      pool, y, dz, scale, bias, mean, rstd, m, n, dscale, dbias);
  const BnArgs bn{scale, bias, mean, rstd, &g};
  const int64_t kp = (k + 15) / 16 * 16;
  std::vector<float> wt(n * kp, 0.f);
  for (int64_t c = 0; c < k; ++c) {
    for (int64_t j = 0; j < n; ++j) wt[j * kp + c] = w[c * n + j];
  }
  const GroupChunks gc(m);
  std::vector<double> partial(gc.chunks * k * n, 0.0);
  effdet::ParallelFor(pool, gc.chunks, [&](int64_t chunk) {
    std::vector<float> dyb(kRows * n), acc(k * n);
    double* d = partial.data() + chunk * k * n;
    const int64_t g_hi = gc.First(chunk + 1);
    for (int64_t g0 = gc.First(chunk); g0 < g_hi; g0 += kFlushGroups) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t hi = gc.Row(std::min(g_hi, g0 + kFlushGroups));
      int64_t r = gc.Row(g0);
      for (; r + kRows <= hi; r += kRows) {
        BackGroup<A, kRows>(x + r * k, wt.data(), y + r * n, dz + r * n, bn,
                            dyb.data(), acc.data(), dx + r * k, k, kp, n);
      }
      for (; r < hi; ++r) {
        BackGroup<A, 1>(x + r * k, wt.data(), y + r * n, dz + r * n, bn,
                        dyb.data(), acc.data(), dx + r * k, k, kp, n);
      }
      for (int64_t i = 0; i < k * n; ++i) d[i] += acc[i];
    }
  });
  for (int64_t i = 0; i < k * n; ++i) {
    double sum = 0.0;
    for (int64_t c = 0; c < gc.chunks; ++c) sum += partial[c * k * n + i];
    dw[i] = static_cast<float>(sum);
  }
}

// x [M, K] and w [K, N] with K <= kMaxIn and N a multiple of 16.
ffi::Error CheckMatmul(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w,
                       int64_t* m, int64_t* k, int64_t* n) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("pointwise: x [M, K], w [K, N]");
  }
  *m = xd[0];
  *k = wd[0];
  *n = wd[1];
  if (*n % 16 != 0 || *k > kMaxIn || *m == 0) {
    return ffi::Error::InvalidArgument(
        "pointwise: N a multiple of 16, K <= 64, M > 0");
  }
  return ffi::Error::Success();
}

ffi::Error PointwiseBnForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> w,
                              ffi::Buffer<ffi::F32> scale,
                              ffi::Buffer<ffi::F32> bias,
                              ffi::ResultBuffer<ffi::F32> y,
                              ffi::ResultBuffer<ffi::F32> z,
                              ffi::ResultBuffer<ffi::F32> mean,
                              ffi::ResultBuffer<ffi::F32> var, float epsilon,
                              int64_t act) {
  int64_t m, k, n;
  if (auto e = CheckMatmul(x, w, &m, &k, &n); e.failure()) return e;
  auto run = [&]<int A>() {
    BnForwardImpl<A>(pool, x.typed_data(), w.typed_data(), scale.typed_data(),
                     bias.typed_data(), epsilon, m, k, n, y->typed_data(),
                     z->typed_data(), mean->typed_data(), var->typed_data());
  };
  return effdet::WithAct(act, run);
}

ffi::Error PointwiseBnBackward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
    ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> dz,
    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
    ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias,
    int64_t act) {
  int64_t m, k, n;
  if (auto e = CheckMatmul(x, w, &m, &k, &n); e.failure()) return e;
  auto run = [&]<int A>() {
    BnBackwardImpl<A>(pool, x.typed_data(), w.typed_data(), y.typed_data(),
                      dz.typed_data(), scale.typed_data(), bias.typed_data(),
                      mean.typed_data(), rstd.typed_data(), m, k, n,
                      dx->typed_data(), dw->typed_data(),
                      dscale->typed_data(), dbias->typed_data());
  };
  return effdet::WithAct(act, run);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetPointwiseAffineAct, PointwiseAffineAct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetIm2colAffineAct, Im2colAffineAct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // padded x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // shift
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetPointwiseBnForward, PointwiseBnForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [K, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // BN scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // BN bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y = x @ w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // act(BN(y))
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetPointwiseBnBackward, PointwiseBnBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<int64_t>("act"));
