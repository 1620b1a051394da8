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

template <int A>
void ForwardImpl(ffi::ThreadPool& pool, const float* x, const float* scale,
                 const float* bias, float eps, int64_t rows, int64_t c,
                 float* y, float* mean_out, float* var_out) {
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
  ForEachRow(pool, rows, [&](int64_t r) {
    effdet::NormalizeRow<A>(x + r * c, mean_out, mul.data(), bias, c,
                            y + r * c);
  });
}

template <int A>
void BackwardImpl(ffi::ThreadPool& pool, const float* x, const float* dy,
                  const float* scale, const float* bias, const float* mean,
                  const float* rstd, int64_t rows, int64_t c, float* dx,
                  float* dscale, float* dbias) {
  const BnGrad g = effdet::BackwardSums<A>(pool, x, dy, scale, bias, mean,
                                           rstd, rows, c, dscale, dbias);
  ForEachRow(pool, rows, [&](int64_t r) {
    const float* xr = x + r * c;
    const float* gr = dy + r * c;
    float* out = dx + r * c;
    ForChannels(c, [&]<typename V>(int64_t cb) {
      effdet::Store<V>(out + cb, effdet::InputGrad<A, V>(
                                     xr, gr, scale, bias, mean, rstd, g, cb));
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

}  // namespace

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
