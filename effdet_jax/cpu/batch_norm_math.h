// Training-mode BatchNorm + activation arithmetic shared by the kernels
// that own a BN (batch_norm_cpu.cc; pointwise_cpu.cc's expand conv with
// its BN): per-channel sums over rows, and the forward and backward rows.
//
// Statistics: per-chunk sums in double over fixed chunks (cpu_common.h), so
// the fast variance E[x^2] - E[x]^2 keeps its precision at 10^6 pixels and
// results are deterministic.

#ifndef EFFDET_JAX_KERNELS_BATCH_NORM_MATH_H_
#define EFFDET_JAX_KERNELS_BATCH_NORM_MATH_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "cpu_common.h"

namespace effdet {

// dy * act'(z).
template <int A, typename V>
inline V ActGrad(V z, V dy) {
  if constexpr (A == kSwish) {
    const V s = SigmoidFast(z);
    return dy * (s * (1.f + z * (1.f - s)));
  }
  if constexpr (A == kRelu) return z > 0.f ? dy : Splat<V>(0.f);
  if constexpr (A == kRelu6) {
    return (z > 0.f) ? ((z < 6.f) ? dy : Splat<V>(0.f)) : Splat<V>(0.f);
  }
  return dy;
}

// Runs f<V>(c0) over one row's channels: blocks of 16, 8, then 1.
template <typename F>
inline void ForChannels(int64_t c, F&& f) {
  int64_t cb = 0;
  for (; cb + 16 <= c; cb += 16) f.template operator()<V16>(cb);
  for (; cb + 8 <= c; cb += 8) f.template operator()<V8>(cb);
  for (; cb < c; ++cb) f.template operator()<float>(cb);
}

// Rows between flushes of the f32 block sums into the double chunk sums.
constexpr int64_t kBlockRows = 128;

// Both per-channel sums over [lo, hi): `row(r, b1, b2)` adds row r's terms
// into f32 block sums, flushed into the double s1, s2 every kBlockRows.
inline void ChunkSums(int64_t lo, int64_t hi, int64_t c,
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
inline void Sums(ffi::ThreadPool& pool, int64_t rows, int64_t c,
                 const std::function<void(int64_t, float*, float*)>& row,
                 std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t chunks =
      std::max<int64_t>(std::min<int64_t>(rows, kReduceChunks), 1);
  std::vector<double> p1(chunks * c, 0.0), p2(chunks * c, 0.0);
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    ChunkSums(ChunkStart(rows, chunks, chunk),
              ChunkStart(rows, chunks, chunk + 1), c, row,
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

// row(r) for every row, elementwise passes over the pool.
inline void ForEachRow(ffi::ThreadPool& pool, int64_t rows,
                       const std::function<void(int64_t)>& row) {
  const int64_t chunks = LoopChunks(rows, pool);
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t hi = ChunkStart(rows, chunks, chunk + 1);
    for (int64_t r = ChunkStart(rows, chunks, chunk); r < hi; ++r) row(r);
  });
}

// Batch mean and (fast) variance from the sums; `mul` = rstd * scale with
// the jnp form's rounding steps (rsqrt(var + eps) * scale).
inline void Moments(const std::vector<double>& s1,
                    const std::vector<double>& s2, int64_t rows,
                    const float* scale, float eps, float* mean, float* var,
                    float* mul) {
  for (size_t t = 0; t < s1.size(); ++t) {
    const double m = s1[t] / rows;
    const double v = std::max(s2[t] / rows - m * m, 0.0);
    mean[t] = static_cast<float>(m);
    var[t] = static_cast<float>(v);
    mul[t] = (1.f / std::sqrt(var[t] + eps)) * scale[t];
  }
}

// One row of act((x - mean) * mul + bias).
template <int A>
inline void NormalizeRow(const float* xr, const float* mean, const float* mul,
                         const float* bias, int64_t c, float* yr) {
  ForChannels(c, [&]<typename V>(int64_t cb) {
    const V z = (Load<V>(xr + cb) - Load<V>(mean + cb)) * Load<V>(mul + cb) +
                Load<V>(bias + cb);
    Store<V>(yr + cb, Activate<A>(z));
  });
}

// Per-channel constants of BN's input gradient:
//   dx = k * (dz - gb - xhat * gs), k = scale * rstd, gb = sum(dz) / n,
//   gs = sum(dz * xhat) / n, dz the gradient at BN's (pre-activation) output.
struct BnGrad {
  std::vector<float> k, gb, gs;
};

// The backward's reductions over (x, dy): d(bias) = sum(dz), d(scale) =
// sum(dz * xhat), and the constants of dx.
//
// `add` (optional, [images][c]): a per-image, per-channel term added to dy
// (the gradient of a spatial mean of BN's output: squeeze-excitation's),
// `rows_per_image` rows per image.
template <int A>
BnGrad BackwardSums(ffi::ThreadPool& pool, const float* x, const float* dy,
                    const float* scale, const float* bias, const float* mean,
                    const float* rstd, int64_t rows, int64_t c, float* dscale,
                    float* dbias, const float* add = nullptr,
                    int64_t rows_per_image = 1) {
  std::vector<double> s1, s2;
  Sums(pool, rows, c,
       [&](int64_t r, float* b1, float* b2) {
         const float* xr = x + r * c;
         const float* gr = dy + r * c;
         const float* ar = add ? add + r / rows_per_image * c : nullptr;
         ForChannels(c, [&]<typename V>(int64_t cb) {
           const V xhat =
               (Load<V>(xr + cb) - Load<V>(mean + cb)) * Load<V>(rstd + cb);
           const V z = xhat * Load<V>(scale + cb) + Load<V>(bias + cb);
           V g = Load<V>(gr + cb);
           if (ar) g += Load<V>(ar + cb);
           const V dz = ActGrad<A>(z, g);
           Store<V>(b1 + cb, Load<V>(b1 + cb) + dz);
           Store<V>(b2 + cb, Load<V>(b2 + cb) + dz * xhat);
         });
       },
       s1, s2);
  BnGrad g{std::vector<float>(c), std::vector<float>(c),
           std::vector<float>(c)};
  for (int64_t t = 0; t < c; ++t) {
    dbias[t] = static_cast<float>(s1[t]);
    dscale[t] = static_cast<float>(s2[t]);
    g.gb[t] = dbias[t] / rows;
    g.gs[t] = dscale[t] / rows;
    g.k[t] = scale[t] * rstd[t];
  }
  return g;
}

// BN's input gradient for the vector of channels at cb, its per-channel
// constants loaded once for many rows: operator()(x, dy) is dx.
template <typename V>
struct BnGradConsts {
  V mean, rstd, scale, bias, k, gb, gs;
  BnGradConsts(const float* scale_, const float* bias_, const float* mean_,
               const float* rstd_, const BnGrad& g, int64_t cb)
      : mean(Load<V>(mean_ + cb)),
        rstd(Load<V>(rstd_ + cb)),
        scale(Load<V>(scale_ + cb)),
        bias(Load<V>(bias_ + cb)),
        k(Load<V>(g.k.data() + cb)),
        gb(Load<V>(g.gb.data() + cb)),
        gs(Load<V>(g.gs.data() + cb)) {}
  template <int A>
  V operator()(V x, V dy) const {
    const V xhat = (x - mean) * rstd;
    const V dz = ActGrad<A>(xhat * scale + bias, dy);
    return k * (dz - gb - xhat * gs);
  }
};

}  // namespace effdet

#endif  // EFFDET_JAX_KERNELS_BATCH_NORM_MATH_H_
