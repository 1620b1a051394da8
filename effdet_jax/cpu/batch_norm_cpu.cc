// Training-mode BatchNorm + activation (f32) for XLA:CPU.
//
// EfficientNet's train step on XLA:CPU is bound by memory traffic, and BN
// is most of it: XLA reads the input once per statistic and again to
// normalise, and the backward pass reads x and dy once per reduction. Here
// the forward is two passes (both statistics in one; then normalise and
// activate), the backward two (both reductions in one; then dx), and the
// activation and its derivative are computed in registers.
//
// The arithmetic (statistics in double, deterministic) is batch_norm_math.h.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "batch_norm_math.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using effdet::BnGrad;
using effdet::ForChannels;
using effdet::ForEachRow;
using effdet::V16;
using effdet::WithAct;

// Normalise + activate rows [lo, hi) of one image, adding the output into
// `pooled` (double, [c]): f32 block sums flushed every kBlockRows rows.
template <int A>
void NormalizePooled(const float* x, const float* mean, const float* mul,
                     const float* bias, int64_t lo, int64_t hi, int64_t c,
                     float* y, double* pooled) {
  std::vector<float> b(c);
  for (int64_t r0 = lo; r0 < hi; r0 += effdet::kBlockRows) {
    std::fill(b.begin(), b.end(), 0.f);
    for (int64_t r = r0; r < std::min(hi, r0 + effdet::kBlockRows); ++r) {
      float* yr = y + r * c;
      effdet::NormalizeRow<A>(x + r * c, mean, mul, bias, c, yr);
      ForChannels(c, [&]<typename V>(int64_t cb) {
        effdet::Store<V>(b.data() + cb,
                         effdet::Load<V>(b.data() + cb) +
                             effdet::Load<V>(yr + cb));
      });
    }
    for (int64_t t = 0; t < c; ++t) pooled[t] += b[t];
  }
}

// `pooled` (optional, [images][c]): the mean of the output over each
// image's rows (squeeze-excitation's input), summed as the rows are
// written, over fixed chunks of each image (deterministic).
template <int A>
void ForwardImpl(ffi::ThreadPool& pool, const float* x, const float* scale,
                 const float* bias, float eps, int64_t rows, int64_t c,
                 float* y, float* mean_out, float* var_out,
                 float* pooled = nullptr, int64_t images = 1) {
  std::vector<double> s1, s2;
  effdet::Sums(pool, rows, c,
               [&](int64_t r, float* b1, float* b2) {
                 const float* xr = x + r * c;
                 for (int64_t t = 0; t < c; ++t) {
                   b1[t] += xr[t];
                   b2[t] += xr[t] * xr[t];
                 }
               },
               s1, s2);
  std::vector<float> mul(c);
  effdet::Moments(s1, s2, rows, scale, eps, mean_out, var_out, mul.data());
  if (pooled == nullptr) {
    ForEachRow(pool, rows, [&](int64_t r) {
      effdet::NormalizeRow<A>(x + r * c, mean_out, mul.data(), bias, c,
                              y + r * c);
    });
    return;
  }
  const int64_t per = rows / images;
  const int64_t chunks = std::max<int64_t>(
      std::min<int64_t>(effdet::kReduceChunks / images, per), 1);
  std::vector<double> part(images * chunks * c, 0.0);
  effdet::ParallelFor(pool, images * chunks, [&](int64_t item) {
    const int64_t img = item / chunks, k = item % chunks;
    NormalizePooled<A>(x, mean_out, mul.data(), bias,
                       img * per + effdet::ChunkStart(per, chunks, k),
                       img * per + effdet::ChunkStart(per, chunks, k + 1), c,
                       y, part.data() + item * c);
  });
  for (int64_t img = 0; img < images; ++img) {
    for (int64_t t = 0; t < c; ++t) {
      double sum = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        sum += part[(img * chunks + k) * c + t];
      }
      pooled[img * c + t] = static_cast<float>(sum / per);
    }
  }
}

// `add` (optional, [images][c]): added to dy per image (BackwardSums).
template <int A>
void BackwardImpl(ffi::ThreadPool& pool, const float* x, const float* dy,
                  const float* scale, const float* bias, const float* mean,
                  const float* rstd, int64_t rows, int64_t c, float* dx,
                  float* dscale, float* dbias, const float* add = nullptr,
                  int64_t images = 1) {
  const int64_t per = rows / images;
  const BnGrad g = effdet::BackwardSums<A>(
      pool, x, dy, scale, bias, mean, rstd, rows, c, dscale, dbias, add, per);
  ForEachRow(pool, rows, [&](int64_t r) {
    const float* xr = x + r * c;
    const float* gr = dy + r * c;
    const float* ar = add ? add + r / per * c : nullptr;
    float* out = dx + r * c;
    ForChannels(c, [&]<typename V>(int64_t cb) {
      const effdet::BnGradConsts<V> k(scale, bias, mean, rstd, g, cb);
      V d = effdet::Load<V>(gr + cb);
      if (ar) d += effdet::Load<V>(ar + cb);
      effdet::Store<V>(out + cb,
                       k.template operator()<A>(effdet::Load<V>(xr + cb), d));
    });
  });
}

int64_t Rows(ffi::Span<const int64_t> dims) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return rows;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> var, float epsilon,
                   int64_t act) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("rank 0 input");
  const int64_t c = dims.back(), rows = Rows(dims);
  if (rows == 0) return ffi::Error::InvalidArgument("empty batch");
  auto run = [&]<int A>() {
    ForwardImpl<A>(pool, x.typed_data(), scale.typed_data(),
                   bias.typed_data(), epsilon, rows, c, y->typed_data(),
                   mean->typed_data(), var->typed_data());
  };
  return WithAct(act, run);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> rstd,
                    ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, int64_t act) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("rank 0 input");
  const int64_t c = dims.back(), rows = Rows(dims);
  if (rows == 0) return ffi::Error::InvalidArgument("empty batch");
  auto run = [&]<int A>() {
    BackwardImpl<A>(pool, x.typed_data(), dy.typed_data(), scale.typed_data(),
                    bias.typed_data(), mean.typed_data(), rstd.typed_data(),
                    rows, c, dx->typed_data(), dscale->typed_data(),
                    dbias->typed_data());
  };
  return WithAct(act, run);
}

// The forward with squeeze-excitation's input: x [B, ..., C] (images on
// the first axis), pooled [B, C] the output's mean over each image.
ffi::Error ForwardPooled(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> bias,
                         ffi::ResultBuffer<ffi::F32> y,
                         ffi::ResultBuffer<ffi::F32> mean,
                         ffi::ResultBuffer<ffi::F32> var,
                         ffi::ResultBuffer<ffi::F32> pooled, float epsilon,
                         int64_t act) {
  auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("x [B, ..., C]");
  const int64_t c = dims.back(), rows = Rows(dims), images = dims[0];
  if (rows == 0) return ffi::Error::InvalidArgument("empty batch");
  auto run = [&]<int A>() {
    ForwardImpl<A>(pool, x.typed_data(), scale.typed_data(),
                   bias.typed_data(), epsilon, rows, c, y->typed_data(),
                   mean->typed_data(), var->typed_data(),
                   pooled->typed_data(), images);
  };
  return WithAct(act, run);
}

// The backward given also the cotangent of `pooled`, already divided by
// the pixels per image (`dpooled_per_pixel` [B, C]).
ffi::Error BackwardPooled(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
    ffi::Buffer<ffi::F32> dpooled_per_pixel, ffi::Buffer<ffi::F32> scale,
    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
    ffi::Buffer<ffi::F32> rstd, ffi::ResultBuffer<ffi::F32> dx,
    ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias,
    int64_t act) {
  auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("x [B, ..., C]");
  const int64_t c = dims.back(), rows = Rows(dims), images = dims[0];
  if (rows == 0) return ffi::Error::InvalidArgument("empty batch");
  auto run = [&]<int A>() {
    BackwardImpl<A>(pool, x.typed_data(), dy.typed_data(), scale.typed_data(),
                    bias.typed_data(), mean.typed_data(), rstd.typed_data(),
                    rows, c, dx->typed_data(), dscale->typed_data(),
                    dbias->typed_data(), dpooled_per_pixel.typed_data(),
                    images);
  };
  return WithAct(act, run);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetBatchNormForwardPooled, ForwardPooled,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // pooled
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetBatchNormBackwardPooled, BackwardPooled,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dpooled / HW
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetBatchNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetBatchNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<int64_t>("act"));
