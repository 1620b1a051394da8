// Kernel gradients of convolutions with few channels on both sides, for
// XLA:CPU: dW = x^T dy summed over very many rows.
//
// At EfficientNet's high resolutions these products contract 10^5-10^6
// rows into a tiny [C, D] output (the D0 b8 stem: 524288 rows into
// [27, 32]; block 0's projection: 65536 rows per image into [32, 16]).
// XLA:CPU ran them as Eigen dots at about a third of the memory bandwidth
// (11-12 ms each); here each row is read once and contracted into sums
// that stay in registers for a block of rows.
//
// One operand is split into 16-lane vectors (V), the other read as scalars
// (S) that multiply them: sums[s][lanes] += S[r, s] * V[r, lanes]. V is the
// operand whose width wastes fewer lanes. A tile of up to kMaxTile scalars
// sweeps a block of kBlockRows rows with its sums in registers; blocks are
// added into f32 sums, those into double every kFlushBlocks blocks, and the
// fixed chunks of rows in chunk order: the same bits whatever the thread
// count.
//
// Two ways to find row r's scalars: a plain matrix (EffdetWeightGrad,
// per image: [B, M, P] x [B, M, Q] -> [B, P, Q]), or the k x k patch of an
// output pixel read straight from the padded image (EffdetIm2colWeightGrad,
// the stem's kernel gradient without its [B, H, W, k*k*C] patch matrix:
// the patch is kh runs of kw*C contiguous floats).

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using effdet::Load;
using effdet::LoadLanes;
using effdet::Splat;
using effdet::V16;

constexpr int kMaxTile = 24;          // scalars per tile: its sums in zmm
constexpr int64_t kBlockRows = 32;    // rows a tile sweeps (in L1)
constexpr int64_t kFlushBlocks = 16;  // blocks between f32 -> double

// sums[t * stride] += sum over the block's rows of s_r[t] * v_r, t < T,
// with s_r = srow[r] + soff and v_r the `lanes` floats at v + r * vs.
template <int T>
void Tile(const float* const* srow, int64_t soff, const float* v, int64_t vs,
          int64_t rows, int64_t lanes, float* sums, int64_t stride) {
  V16 a[T];
#pragma GCC unroll 24
  for (int t = 0; t < T; ++t) a[t] = Splat<V16>(0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const V16 x = LoadLanes(v + r * vs, lanes);
    const float* s = srow[r] + soff;
#pragma GCC unroll 24
    for (int t = 0; t < T; ++t) a[t] += s[t] * x;
  }
#pragma GCC unroll 24
  for (int t = 0; t < T; ++t) {
    float* p = sums + t * stride;
    effdet::Store<V16>(p, Load<V16>(p) + a[t]);
  }
}

using TileFn = void (*)(const float* const*, int64_t, const float*, int64_t,
                        int64_t, int64_t, float*, int64_t);

template <int... I>
constexpr std::array<TileFn, sizeof...(I)> TileTable(
    std::integer_sequence<int, I...>) {
  return {&Tile<I + 1>...};
}
constexpr auto kTiles = TileTable(std::make_integer_sequence<int, kMaxTile>{});

// Where row r's scalars are: runs[i] = (offset from the row's base, length);
// a plain matrix has one run, a k x k patch kh runs of kw * C.
struct Scalars {
  std::vector<std::pair<int64_t, int64_t>> runs;
  int64_t width = 0;  // all runs: the S side of the output
};

// Sums over rows [lo, hi) of one image into `out` (double, [S][Vp]):
// base(r) is row r's scalar base pointer, v row r's vector operand.
template <typename Base>
void ChunkSums(Base base, const Scalars& sc, const float* v, int64_t vw,
               int64_t lo, int64_t hi, double* out) {
  const int64_t vp = (vw + 15) / 16 * 16;
  std::vector<float> sums(sc.width * vp, 0.f);
  const float* rows_at[kBlockRows];
  int64_t blocks = 0;
  auto flush = [&] {
    for (int64_t i = 0; i < sc.width * vp; ++i) out[i] += sums[i];
    std::fill(sums.begin(), sums.end(), 0.f);
  };
  for (int64_t r0 = lo; r0 < hi; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, hi - r0);
    for (int64_t r = 0; r < rows; ++r) rows_at[r] = base(r0 + r);
    int64_t s = 0;
    for (const auto& [off, len] : sc.runs) {
      for (int64_t j = 0; j < len; j += kMaxTile) {
        const int64_t t = std::min<int64_t>(kMaxTile, len - j);
        for (int64_t vb = 0; vb < vw; vb += 16) {
          kTiles[t - 1](rows_at, off + j, v + r0 * vw + vb, vw, rows,
                        std::min<int64_t>(16, vw - vb),
                        sums.data() + (s + j) * vp + vb, vp);
        }
      }
      s += len;
    }
    if (++blocks % kFlushBlocks == 0) flush();
  }
  flush();
}

// Chunks of one image's rows: enough work items for the pool whatever the
// batch, a fixed number (determinism).
int64_t ChunksPerImage(int64_t images, int64_t rows) {
  const int64_t want = std::max<int64_t>(effdet::kReduceChunks / images, 1);
  return std::max<int64_t>(std::min(want, rows / kBlockRows), 1);
}

// out[b] = sum over chunks, in order, of the partials [S][Vp]; written as
// [S][V] (transpose = false) or [V][S].
void Finish(const std::vector<double>& partial, int64_t images,
            int64_t chunks, int64_t sw, int64_t vw, bool transpose,
            float* out) {
  const int64_t vp = (vw + 15) / 16 * 16;
  for (int64_t b = 0; b < images; ++b) {
    for (int64_t s = 0; s < sw; ++s) {
      for (int64_t l = 0; l < vw; ++l) {
        double sum = 0.0;
        for (int64_t c = 0; c < chunks; ++c) {
          sum += partial[((b * chunks + c) * sw + s) * vp + l];
        }
        float* o = out + b * sw * vw;
        o[transpose ? l * sw + s : s * vw + l] = static_cast<float>(sum);
      }
    }
  }
}

ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                      ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 3 || bd.size() != 3 || ad[0] != bd[0] || ad[1] != bd[1]) {
    return ffi::Error::InvalidArgument("weight_grad: a [B, M, P], b [B, M, Q]");
  }
  const int64_t images = ad[0], m = ad[1], p = ad[2], q = bd[2];
  // The vector side: fewer multiply-adds per row (its lanes padded to 16).
  const bool b_vec = (q + 15) / 16 * p <= (p + 15) / 16 * q;
  const float* sv = b_vec ? a.typed_data() : b.typed_data();
  const float* vv = b_vec ? b.typed_data() : a.typed_data();
  const int64_t sw = b_vec ? p : q, vw = b_vec ? q : p;
  const int64_t vp = (vw + 15) / 16 * 16;
  Scalars sc{{{0, sw}}, sw};
  const int64_t chunks = ChunksPerImage(images, m);
  std::vector<double> partial(images * chunks * sw * vp, 0.0);
  effdet::ParallelFor(pool, images * chunks, [&](int64_t item) {
    const int64_t img = item / chunks, c = item % chunks;
    const float* s_img = sv + img * m * sw;
    ChunkSums([&](int64_t r) { return s_img + r * sw; }, sc,
              vv + img * m * vw, vw, effdet::ChunkStart(m, chunks, c),
              effdet::ChunkStart(m, chunks, c + 1),
              partial.data() + item * sw * vp);
  });
  Finish(partial, images, chunks, sw, vw, !b_vec, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error Im2colWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp,
                            ffi::Buffer<ffi::F32> dy,
                            ffi::ResultBuffer<ffi::F32> out, int64_t kh,
                            int64_t kw, int64_t stride) {
  auto xd = xp.dimensions();
  auto dd = dy.dimensions();
  if (xd.size() != 4 || dd.size() != 4 || xd[0] != dd[0] || kh < 1 ||
      kw < 1 || stride < 1 || (dd[1] - 1) * stride + kh > xd[1] ||
      (dd[2] - 1) * stride + kw > xd[2]) {
    return ffi::Error::InvalidArgument(
        "im2col_weight_grad: padded x [B, Hp, Wp, C], dy [B, H, W, D] and "
        "the window must match");
  }
  const int64_t ho = dd[1], wo = dd[2], q = dd[3], c = xd[3];
  const int64_t img_row = xd[2] * c, img = xd[1] * img_row;
  const int64_t rows = xd[0] * ho * wo, vp = (q + 15) / 16 * 16;
  Scalars sc;
  for (int64_t i = 0; i < kh; ++i) sc.runs.push_back({i * img_row, kw * c});
  sc.width = kh * kw * c;
  const float* x = xp.typed_data();
  auto base = [&](int64_t r) {
    const int64_t b = r / (ho * wo), oy = r / wo % ho, ox = r % wo;
    return x + b * img + oy * stride * img_row + ox * stride * c;
  };
  const int64_t chunks = ChunksPerImage(1, rows);
  std::vector<double> partial(chunks * sc.width * vp, 0.0);
  effdet::ParallelFor(pool, chunks, [&](int64_t item) {
    ChunkSums(base, sc, dy.typed_data(), q,
              effdet::ChunkStart(rows, chunks, item),
              effdet::ChunkStart(rows, chunks, item + 1),
              partial.data() + item * sc.width * vp);
  });
  Finish(partial, 1, chunks, sc.width, q, false, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a [B, M, P]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b [B, M, Q]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [B, P, Q]

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetIm2colWeightGrad, Im2colWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // padded x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // [k*k*C, D]
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride"));
