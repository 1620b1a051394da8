// The anchor matcher's IoU maxima for XLA:CPU: per anchor the best box
// (value, first row), per box the best anchor (first column), without the
// [B, M, N] IoU matrix.
//
// `detection/targets.py` computes the same in jnp, in blocks of 8 boxes in
// a while loop; XLA:CPU ran that loop's fusions on one thread, ~30 ms of
// the D0 b8 train step for 49104 anchors. Here anchors are split over the
// pool in blocks of 16-lane vectors, each vector sweeping the boxes with
// its maxima in registers. The arithmetic is the jnp form's, operation for
// operation (no contraction into FMAs is possible: no product is added),
// so values and ties come out the same: strict > keeps the first row, and
// per box each lane keeps its first column, lanes and blocks then merged
// in column order.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using effdet::I16;
using effdet::Load;
using effdet::Splat;
using effdet::V16;

constexpr int64_t kBlockAnchors = 4096;

template <typename V>
inline V Min(V a, V b) {
  return a < b ? a : b;
}
template <typename V>
inline V Max(V a, V b) {
  return a > b ? a : b;
}
inline float Min(float a, float b) { return a < b ? a : b; }
inline float Max(float a, float b) { return a > b ? a : b; }

// IoU of box (y0, x0, y1, x1, its area) with anchors a*, their areas aa:
// the jnp form's operations in its order.
template <typename V>
inline V Iou(const float* box, float area_b, V a0, V a1, V a2, V a3, V aa) {
  const V ih = Min(Splat<V>(box[2]), a2) - Max(Splat<V>(box[0]), a0);
  const V iw = Min(Splat<V>(box[3]), a3) - Max(Splat<V>(box[1]), a1);
  const V inter = Max(ih, Splat<V>(0.f)) * Max(iw, Splat<V>(0.f));
  return inter / ((area_b + aa) - inter);
}
template <>
inline float Iou<float>(const float* box, float area_b, float a0, float a1,
                        float a2, float a3, float aa) {
  const float ih = Min(box[2], a2) - Max(box[0], a0);
  const float iw = Min(box[3], a3) - Max(box[1], a1);
  const float inter = Max(ih, 0.f) * Max(iw, 0.f);
  return inter / ((area_b + aa) - inter);
}

// Per box, the best (value, column) so far: 16 lanes, merged at the end.
struct ColBest {
  std::vector<V16> val;
  std::vector<I16> col;
  explicit ColBest(int64_t rows)
      : val(rows, Splat<V16>(-1.f)), col(rows, I16{} + 0) {}
};

// Anchors [lo, hi) of one image against its first `rows` boxes.
void Block(const float* boxes, const float* area_b, const float* at,
           int64_t n, int64_t lo, int64_t hi, int64_t rows, float* best_val,
           int32_t* best_row, float* col_val, int32_t* col_idx) {
  ColBest cb(rows);
  int64_t j = lo;
  for (; j + 16 <= hi; j += 16) {
    const V16 a0 = Load<V16>(at + j), a1 = Load<V16>(at + n + j);
    const V16 a2 = Load<V16>(at + 2 * n + j), a3 = Load<V16>(at + 3 * n + j);
    const V16 aa = (a2 - a0) * (a3 - a1);
    I16 idx;
    for (int l = 0; l < 16; ++l) idx[l] = static_cast<int32_t>(j + l);
    V16 bv = Splat<V16>(-1.f);
    I16 br = I16{} + 0;
    for (int64_t r = 0; r < rows; ++r) {
      const V16 iou = Iou<V16>(boxes + 4 * r, area_b[r], a0, a1, a2, a3, aa);
      const auto better = iou > bv;
      bv = better ? iou : bv;
      br = better ? (I16{} + static_cast<int32_t>(r)) : br;
      const auto col_better = iou > cb.val[r];
      cb.val[r] = col_better ? iou : cb.val[r];
      cb.col[r] = col_better ? idx : cb.col[r];
    }
    effdet::Store<V16>(best_val + j, bv);
    __builtin_memcpy(best_row + j, &br, sizeof(br));
  }
  // Per box: the lanes' best, the first column among equal values; then
  // the tail anchors one by one, after every column before them.
  for (int64_t r = 0; r < rows; ++r) {
    float v = -1.f;
    int32_t c = 0;
    for (int l = 0; l < 16; ++l) {
      const float lv = cb.val[r][l];
      const int32_t lc = cb.col[r][l];
      if (lv > v || (lv == v && lc < c)) {
        v = lv;
        c = lc;
      }
    }
    col_val[r] = v;
    col_idx[r] = c;
  }
  for (; j < hi; ++j) {
    const float a0 = at[j], a1 = at[n + j], a2 = at[2 * n + j],
                a3 = at[3 * n + j];
    const float aa = (a2 - a0) * (a3 - a1);
    float bv = -1.f;
    int32_t br = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const float iou = Iou<float>(boxes + 4 * r, area_b[r], a0, a1, a2, a3, aa);
      if (iou > bv) {
        bv = iou;
        br = static_cast<int32_t>(r);
      }
      if (iou > col_val[r]) {
        col_val[r] = iou;
        col_idx[r] = static_cast<int32_t>(j);
      }
    }
    best_val[j] = bv;
    best_row[j] = br;
  }
}

ffi::Error BestMatches(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> boxes,
                       ffi::Buffer<ffi::S32> valid,
                       ffi::Buffer<ffi::F32> anchors_t,
                       ffi::ResultBuffer<ffi::F32> best_val,
                       ffi::ResultBuffer<ffi::S32> best_row,
                       ffi::ResultBuffer<ffi::S32> best_col) {
  auto bd = boxes.dimensions();
  auto vd = valid.dimensions();
  auto ad = anchors_t.dimensions();
  if (bd.size() != 3 || bd[2] != 4 || vd.size() != 2 || vd[0] != bd[0] ||
      vd[1] != bd[1] || ad.size() != 2 || ad[0] != 4) {
    return ffi::Error::InvalidArgument(
        "best_matches: boxes [B, M, 4], valid [B, M], anchors^T [4, N]");
  }
  const int64_t b = bd[0], m = bd[1], n = ad[1];
  // Rows up to the batch's last valid box, as the jnp loop visits (rows
  // after it only add IoUs of 0, which never win a strict comparison).
  int64_t rows = 0;
  const int32_t* ok = valid.typed_data();
  for (int64_t i = 0; i < b * m; ++i) {
    if (ok[i]) rows = std::max(rows, i % m + 1);
  }
  const float* bx = boxes.typed_data();
  std::vector<float> area(b * m);
  for (int64_t i = 0; i < b * m; ++i) {
    const float* p = bx + 4 * i;
    area[i] = (p[2] - p[0]) * (p[3] - p[1]);
  }
  float* bv = best_val->typed_data();
  int32_t* br = best_row->typed_data();
  int32_t* bc = best_col->typed_data();
  std::fill(bc, bc + b * m, 0);
  if (rows == 0) {
    std::fill(bv, bv + b * n, -1.f);
    std::fill(br, br + b * n, 0);
    return ffi::Error::Success();
  }
  const int64_t blocks = (n + kBlockAnchors - 1) / kBlockAnchors;
  std::vector<float> cv(b * blocks * rows);
  std::vector<int32_t> ci(b * blocks * rows);
  effdet::ParallelFor(pool, b * blocks, [&](int64_t item) {
    const int64_t img = item / blocks, blk = item % blocks;
    const int64_t lo = blk * kBlockAnchors;
    const int64_t hi = std::min(n, lo + kBlockAnchors);
    Block(bx + img * m * 4, area.data() + img * m, anchors_t.typed_data(), n,
          lo, hi, rows, bv + img * n, br + img * n, cv.data() + item * rows,
          ci.data() + item * rows);
  });
  for (int64_t img = 0; img < b; ++img) {
    for (int64_t r = 0; r < rows; ++r) {
      float v = -1.f;
      int32_t c = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i = (img * blocks + blk) * rows + r;
        if (cv[i] > v) {
          v = cv[i];
          c = ci[i];
        }
      }
      bc[img * m + r] = c;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetBestMatches, BestMatches,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // boxes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // valid
                                  .Arg<ffi::Buffer<ffi::F32>>()  // anchors^T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // best_val
                                  .Ret<ffi::Buffer<ffi::S32>>()  // best_row
                                  .Ret<ffi::Buffer<ffi::S32>>());  // best_col
