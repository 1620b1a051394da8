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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using effdet::Load;
using effdet::Splat;
using effdet::Store;
using effdet::V16;

constexpr int kRows = 8;         // rows per group
constexpr int64_t kMaxIn = 64;   // input channels handled here

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

inline void StreamFence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

template <int R, int A, bool Stream>
inline void Group(const float* __restrict x, const float* __restrict w,
                  const float* __restrict scale,
                  const float* __restrict shift, float* __restrict y,
                  int64_t k, int64_t n) {
  for (int64_t nb = 0; nb < n; nb += 16) {
    V16 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = Splat<V16>(0.f);
    for (int64_t c = 0; c < k; ++c) {
      const V16 wv = Load<V16>(w + c * n + nb);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] += x[r * k + c] * wv;
    }
    const V16 sc = Load<V16>(scale + nb), sh = Load<V16>(shift + nb);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V16 out = effdet::Activate<A>(acc[r] * sc + sh);
      float* p = y + r * n + nb;
      if constexpr (Stream) {
        StreamStore(p, out);
      } else {
        Store<V16>(p, out);
      }
    }
  }
}

template <int A, bool Stream>
void Rows(const float* x, const float* w, const float* scale,
          const float* shift, float* y, int64_t lo, int64_t hi, int64_t k,
          int64_t n) {
  int64_t r = lo;
  for (; r + kRows <= hi; r += kRows) {
    Group<kRows, A, Stream>(x + r * k, w, scale, shift, y + r * n, k, n);
  }
  for (; r < hi; ++r) {
    Group<1, A, Stream>(x + r * k, w, scale, shift, y + r * n, k, n);
  }
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
  if (n % 16 != 0 || k > kMaxIn || scale.element_count() != n ||
      shift.element_count() != n) {
    return ffi::Error::InvalidArgument(
        "pointwise: N a multiple of 16, K <= 64, one scale/shift per N");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float* sp = scale.typed_data();
  const float* hp = shift.typed_data();
  float* yp = y->typed_data();
  const bool stream = m * n * 4 >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(yp) % 64 == 0;
  // Chunks of whole groups, a few per thread.
  const int64_t groups = (m + kRows - 1) / kRows;
  const int64_t chunks = effdet::LoopChunks(groups, pool);
  auto run = [&]<int A>() {
    effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
      const int64_t lo = effdet::ChunkStart(groups, chunks, chunk) * kRows;
      const int64_t hi = std::min(
          effdet::ChunkStart(groups, chunks, chunk + 1) * kRows, m);
      if (stream) {
        Rows<A, true>(xp, wp, sp, hp, yp, lo, hi, k, n);
        StreamFence();  // this thread's streamed stores, before the join
      } else {
        Rows<A, false>(xp, wp, sp, hp, yp, lo, hi, k, n);
      }
    });
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
