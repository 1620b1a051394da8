// Training-mode BatchNorm + activation (f32) for XLA:CPU.
//
// EfficientNet's train step on XLA:CPU is bound by memory traffic, and BN
// is most of it: XLA reads the input once per statistic and again to
// normalise, and the backward pass reads x and dy once per reduction. Here
// the forward is two passes (both statistics in one; then normalise and
// activate), the backward two (both reductions in one; then dx), and the
// activation and its derivative are computed in registers.
//
// Statistics: per-chunk sums in double over fixed chunks (cpu_common.h), so
// the fast variance E[x^2] - E[x]^2 keeps its precision at 10^6 pixels and
// results are deterministic.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using effdet::I16;
using effdet::I8;
using effdet::Load;
using effdet::Splat;
using effdet::Store;
using effdet::V16;
using effdet::V8;


using effdet::Activate;
using effdet::Exp;
using effdet::WithAct;
using effdet::kNone;
using effdet::kRelu;
using effdet::kRelu6;
using effdet::kSwish;
using effdet::Sigmoid;

// dy * act'(z).
template <int A, typename V>
inline V ActGrad(V z, V dy) {
  if constexpr (A == kSwish) {
    const V s = Sigmoid(z);
    return dy * (s * (1.f + z * (1.f - s)));
  }
  if constexpr (A == kRelu) return z > 0.f ? dy : Splat<V>(0.f);
  if constexpr (A == kRelu6) {
    return (z > 0.f) ? ((z < 6.f) ? dy : Splat<V>(0.f)) : Splat<V>(0.f);
  }
  return dy;
}

// Runs f<V, L>(c0) over one row's channels: blocks of 16, 8, then 1.
template <typename F>
inline void ForChannels(int64_t c, F&& f) {
  int64_t cb = 0;
  for (; cb + 16 <= c; cb += 16) f.template operator()<V16>(cb);
  for (; cb + 8 <= c; cb += 8) f.template operator()<V8>(cb);
  for (; cb < c; ++cb) f.template operator()<float>(cb);
}

// Sums over a chunk of rows into double accumulators, via f32 partials over
// blocks of kBlockRows rows.
constexpr int64_t kBlockRows = 128;

void ChunkSums(int64_t lo, int64_t hi, int64_t c,
               const std::function<void(int64_t, float*, float*)>& row,
               double* s1, double* s2) {
  std::vector<float> b1(c), b2(c);
  for (int64_t r0 = lo; r0 < hi; r0 += kBlockRows) {
    std::fill(b1.begin(), b1.end(), 0.f);
    std::fill(b2.begin(), b2.end(), 0.f);
    for (int64_t r = r0; r < std::min(hi, r0 + kBlockRows); ++r) {
      row(r, b1.data(), b2.data());
    }
    for (int64_t t = 0; t < c; ++t) {
      s1[t] += b1[t];
      s2[t] += b2[t];
    }
  }
}

// Both sums over all rows, chunk partials added in order.
void Sums(ffi::ThreadPool& pool, int64_t rows, int64_t c,
          const std::function<void(int64_t, float*, float*)>& row,
          std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t chunks = std::max<int64_t>(
      std::min<int64_t>(rows, effdet::kReduceChunks), 1);
  std::vector<double> p1(chunks * c, 0.0), p2(chunks * c, 0.0);
  effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
    ChunkSums(effdet::ChunkStart(rows, chunks, chunk),
              effdet::ChunkStart(rows, chunks, chunk + 1), c, row,
              p1.data() + chunk * c, p2.data() + chunk * c);
  });
  s1.assign(c, 0.0);
  s2.assign(c, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t t = 0; t < c; ++t) {
      s1[t] += p1[k * c + t];
      s2[t] += p2[k * c + t];
    }
  }
}

// Elementwise over all rows.
void ForEachRow(ffi::ThreadPool& pool, int64_t rows,
                const std::function<void(int64_t)>& row) {
  const int64_t chunks = effdet::LoopChunks(rows, pool);
  effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t hi = effdet::ChunkStart(rows, chunks, chunk + 1);
    for (int64_t r = effdet::ChunkStart(rows, chunks, chunk); r < hi; ++r) {
      row(r);
    }
  });
}

template <int A>
void ForwardImpl(ffi::ThreadPool& pool, const float* x, const float* scale,
                 const float* bias, float eps, int64_t rows, int64_t c,
                 float* y, float* mean_out, float* var_out) {
  std::vector<double> s1, s2;
  Sums(pool, rows, c,
       [&](int64_t r, float* b1, float* b2) {
         const float* xr = x + r * c;
         for (int64_t t = 0; t < c; ++t) {
           b1[t] += xr[t];
           b2[t] += xr[t] * xr[t];
         }
       },
       s1, s2);
  std::vector<float> mean(c), mul(c);
  for (int64_t t = 0; t < c; ++t) {
    const double m = s1[t] / rows;
    const double v = std::max(s2[t] / rows - m * m, 0.0);
    mean[t] = static_cast<float>(m);
    mean_out[t] = mean[t];
    var_out[t] = static_cast<float>(v);
    // Same rounding steps as the jnp form: rsqrt(var + eps) * scale.
    mul[t] = (1.f / std::sqrt(var_out[t] + eps)) * scale[t];
  }
  ForEachRow(pool, rows, [&](int64_t r) {
    const float* xr = x + r * c;
    float* yr = y + r * c;
    const float* m = mean.data();
    const float* k = mul.data();
    auto f = [&]<typename V>(int64_t cb) {
      const V z = (Load<V>(xr + cb) - Load<V>(m + cb)) * Load<V>(k + cb) +
                  Load<V>(bias + cb);
      Store<V>(yr + cb, Activate<A>(z));
    };
    ForChannels(c, f);
  });
}

template <int A>
void BackwardImpl(ffi::ThreadPool& pool, const float* x, const float* dy,
                  const float* scale, const float* bias, const float* mean,
                  const float* rstd, int64_t rows, int64_t c, float* dx,
                  float* dscale, float* dbias) {
  std::vector<double> s1, s2;
  Sums(pool, rows, c,
       [&](int64_t r, float* b1, float* b2) {
         const float* xr = x + r * c;
         const float* gr = dy + r * c;
         auto f = [&]<typename V>(int64_t cb) {
           const V xhat =
               (Load<V>(xr + cb) - Load<V>(mean + cb)) * Load<V>(rstd + cb);
           const V z = xhat * Load<V>(scale + cb) + Load<V>(bias + cb);
           const V dz = ActGrad<A>(z, Load<V>(gr + cb));
           Store<V>(b1 + cb, Load<V>(b1 + cb) + dz);
           Store<V>(b2 + cb, Load<V>(b2 + cb) + dz * xhat);
         };
         ForChannels(c, f);
       },
       s1, s2);
  std::vector<float> gb(c), gs(c), k(c);
  for (int64_t t = 0; t < c; ++t) {
    dbias[t] = static_cast<float>(s1[t]);
    dscale[t] = static_cast<float>(s2[t]);
    gb[t] = dbias[t] / rows;
    gs[t] = dscale[t] / rows;
    k[t] = scale[t] * rstd[t];
  }
  const float *kp = k.data(), *gbp = gb.data(), *gsp = gs.data();
  ForEachRow(pool, rows, [&](int64_t r) {
    const float* xr = x + r * c;
    const float* gr = dy + r * c;
    float* out = dx + r * c;
    auto f = [&]<typename V>(int64_t cb) {
      const V xhat =
          (Load<V>(xr + cb) - Load<V>(mean + cb)) * Load<V>(rstd + cb);
      const V z = xhat * Load<V>(scale + cb) + Load<V>(bias + cb);
      const V dz = ActGrad<A>(z, Load<V>(gr + cb));
      Store<V>(out + cb, Load<V>(kp + cb) * (dz - Load<V>(gbp + cb) -
                                             xhat * Load<V>(gsp + cb)));
    };
    ForChannels(c, f);
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
