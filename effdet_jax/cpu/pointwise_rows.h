// The inner loops of a 1x1 convolution with its epilogue, shared by the
// pointwise kernels (pointwise_cpu.cc) and the depthwise kernel that
// computes its expand layer's rows itself (depthwise_cpu.cc): groups of R
// rows keep R accumulators per 16 output channels, the weights' column
// block read from L1 once per group.

#ifndef EFFDET_JAX_KERNELS_POINTWISE_ROWS_H_
#define EFFDET_JAX_KERNELS_POINTWISE_ROWS_H_

#include <cstdint>

#include "batch_norm_math.h"
#include "cpu_common.h"

namespace effdet::pointwise {

constexpr int kRows = 8;  // rows per group

// One output vector at p, `left` = the row's lanes from p on.
template <bool Stream>
inline void StoreOut(float* p, V16 out, int64_t left) {
  if constexpr (Stream) {
    StreamStore(p, out);
  } else if (left >= 16) {
    Store<V16>(p, out);
  } else {
    StorePartial(p, out, left);
  }
}

// R rows: y = act(x @ w * scale + shift), or with Stats plain y = x @ w,
// its per-channel sum and sum of squares added into s1, s2. w, scale and
// shift are n wide (a multiple of 16); y's rows are ny <= n wide, the last
// block's surplus lanes not stored (ny == n with Stats or Stream).
template <int R, int A, bool Stream, bool Stats = false>
inline void Group(const float* __restrict x, const float* __restrict w,
                  const float* __restrict scale,
                  const float* __restrict shift, float* __restrict y,
                  int64_t k, int64_t n, int64_t ny,
                  float* __restrict s1 = nullptr,
                  float* __restrict s2 = nullptr) {
  for (int64_t nb = 0; nb < n; nb += 16) {
    V16 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = Splat<V16>(0.f);
    for (int64_t c = 0; c < k; ++c) {
      const V16 wv = Load<V16>(w + c * n + nb);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] += x[r * k + c] * wv;
    }
    V16 sc, sh, a1, a2;
    if constexpr (Stats) {
      a1 = Load<V16>(s1 + nb);
      a2 = Load<V16>(s2 + nb);
    } else {
      sc = Load<V16>(scale + nb);
      sh = Load<V16>(shift + nb);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      V16 out;
      if constexpr (Stats) {
        out = acc[r];
        a1 += out;
        a2 += out * out;
      } else {
        out = effdet::Activate<A>(acc[r] * sc + sh);
      }
      StoreOut<Stream>(y + r * ny + nb, out, ny - nb);
    }
    if constexpr (Stats) {
      Store<V16>(s1 + nb, a1);
      Store<V16>(s2 + nb, a2);
    }
  }
}

// Rows [lo, hi) in groups of kRows, then one by one (Group's arguments).
template <int A, bool Stream, bool Stats = false>
void Rows(const float* x, const float* w, const float* scale,
          const float* shift, float* y, int64_t lo, int64_t hi, int64_t k,
          int64_t n, int64_t ny, float* s1 = nullptr, float* s2 = nullptr) {
  int64_t r = lo;
  for (; r + kRows <= hi; r += kRows) {
    Group<kRows, A, Stream, Stats>(x + r * k, w, scale, shift, y + r * ny, k,
                                   n, ny, s1, s2);
  }
  for (; r < hi; ++r) {
    Group<1, A, Stream, Stats>(x + r * k, w, scale, shift, y + r * ny, k, n,
                               ny, s1, s2);
  }
}

}  // namespace effdet::pointwise

#endif  // EFFDET_JAX_KERNELS_POINTWISE_ROWS_H_
