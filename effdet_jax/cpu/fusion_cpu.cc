// A BiFPN node's fast normalized fusion and the activation after it (f32):
//   out = act(sum_i (x_i * w_i) / t),
// w_i = relu(the node's fusion weights), t = sum_i w_i + 1e-4, per channel
// (broadcast from scalars by the caller for the scalar-weight method).
//
// XLA:CPU ran the jnp form as four to five passes forward (each product,
// the sum, the activation, its residuals) and, backward, one full-tensor
// reduction per input for the weights' gradients, each a pass over the
// maps (D0 b8: ~45 ms of the train step). Here the forward reads the n
// inputs once and writes the output; the backward reads the output's
// gradient and the n inputs once, writes the n input gradients and sums
// the per-channel products the weights' gradients need:
//   sums[i] = sum over rows of ga * (x_i - s)  (= t * d loss / d w_i),
// ga = g * act'(s), s = the fused sum (recomputed); the difference is
// taken per value, not of two large sums (which cancel when one weight
// carries the node). Per-chunk sums in
// double over fixed chunks, added in order: the same bits whatever the
// thread count. The arithmetic is the jnp form's, op for op: (x_i * w_i) /
// t summed left to right; dx_i = (ga / t) * w_i.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "batch_norm_math.h"
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using effdet::ForChannels;
using effdet::Load;
using effdet::Splat;
using effdet::Store;

constexpr int64_t kMaxInputs = 8;

// The operands, checked: n inputs [rows, C] (any leading shape), w [n, C],
// t [C].
struct Operands {
  int64_t n = 0, rows = 0, c = 0;
  const float* x[kMaxInputs] = {};
};

ffi::Error Collect(ffi::RemainingArgs& inputs, ffi::Buffer<ffi::F32>& w,
                   ffi::Buffer<ffi::F32>& t, Operands* op) {
  op->n = static_cast<int64_t>(inputs.size());
  if (op->n < 1 || op->n > kMaxInputs) {
    return ffi::Error::InvalidArgument("fusion: 1 to 8 inputs");
  }
  for (int64_t i = 0; i < op->n; ++i) {
    auto b = inputs.get<ffi::Buffer<ffi::F32>>(i);
    if (b.has_error()) return b.error();
    auto dims = b->dimensions();
    if (dims.size() < 1) return ffi::Error::InvalidArgument("rank 0 input");
    const int64_t c = dims.back();
    const int64_t rows = c ? b->element_count() / c : 0;
    if (i == 0) {
      op->c = c;
      op->rows = rows;
    } else if (c != op->c || rows != op->rows) {
      return ffi::Error::InvalidArgument("fusion: inputs of unequal shapes");
    }
    op->x[i] = b->typed_data();
  }
  if (w.element_count() != op->n * op->c || t.element_count() != op->c ||
      op->rows == 0 || op->c == 0) {
    return ffi::Error::InvalidArgument("fusion: w [n, C], t [C], rows > 0");
  }
  return ffi::Error::Success();
}

// The fused sum of one row's channels [cb, cb + lanes of V) at `off`,
// the jnp form's arithmetic; the inputs' vectors kept in `xs`.
template <typename V>
inline V FusedSum(const Operands& op, const float* w, const float* t,
                  int64_t off, int64_t cb, V* xs) {
  const V tv = Load<V>(t + cb);
  xs[0] = Load<V>(op.x[0] + off + cb);
  V s = (xs[0] * Load<V>(w + cb)) / tv;
  for (int64_t i = 1; i < op.n; ++i) {
    xs[i] = Load<V>(op.x[i] + off + cb);
    s += (xs[i] * Load<V>(w + i * op.c + cb)) / tv;
  }
  return s;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> t, ffi::RemainingArgs inputs,
                   ffi::ResultBuffer<ffi::F32> out, int64_t act) {
  Operands op;
  if (auto e = Collect(inputs, w, t, &op); e.failure()) return e;
  if (out->element_count() != op.rows * op.c) {
    return ffi::Error::InvalidArgument("fusion: output [rows, C]");
  }
  const float* wd = w.typed_data();
  const float* td = t.typed_data();
  float* y = out->typed_data();
  auto run = [&]<int A>() {
    effdet::ForEachRow(pool, op.rows, [&](int64_t r) {
      const int64_t off = r * op.c;
      ForChannels(op.c, [&]<typename V>(int64_t cb) {
        V xs[kMaxInputs];
        const V s = FusedSum<V>(op, wd, td, off, cb, xs);
        Store<V>(y + off + cb, effdet::Activate<A>(s));
      });
    });
  };
  return effdet::WithAct(act, run);
}

// Rows between flushes of the f32 block sums into the double chunk sums.
constexpr int64_t kBlockRows = 128;

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                    ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> t,
                    ffi::RemainingArgs inputs,
                    ffi::ResultBuffer<ffi::F32> sums,
                    ffi::RemainingRets grads, int64_t act) {
  Operands op;
  if (auto e = Collect(inputs, w, t, &op); e.failure()) return e;
  const int64_t n = op.n, c = op.c, rows = op.rows;
  if (g.element_count() != rows * c || sums->element_count() != n * c ||
      static_cast<int64_t>(grads.size()) != n) {
    return ffi::Error::InvalidArgument(
        "fusion backward: g [rows, C], sums [n, C], n gradients");
  }
  float* dx[kMaxInputs] = {};
  for (int64_t i = 0; i < n; ++i) {
    auto b = grads.get<ffi::Buffer<ffi::F32>>(i);
    if (b.has_error()) return b.error();
    if ((*b)->element_count() != rows * c) {
      return ffi::Error::InvalidArgument("fusion backward: gradient shape");
    }
    dx[i] = (*b)->typed_data();
  }
  const float* gd = g.typed_data();
  const float* wd = w.typed_data();
  const float* td = t.typed_data();
  const int64_t chunks =
      std::max<int64_t>(std::min<int64_t>(rows, effdet::kReduceChunks), 1);
  const int64_t width = n * c;
  std::vector<double> partial(chunks * width, 0.0);
  auto run = [&]<int A>() {
    effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
      std::vector<float> block(width);
      double* d = partial.data() + chunk * width;
      const int64_t lo = effdet::ChunkStart(rows, chunks, chunk);
      const int64_t hi = effdet::ChunkStart(rows, chunks, chunk + 1);
      for (int64_t r0 = lo; r0 < hi; r0 += kBlockRows) {
        std::fill(block.begin(), block.end(), 0.f);
        for (int64_t r = r0; r < std::min(hi, r0 + kBlockRows); ++r) {
          const int64_t off = r * c;
          ForChannels(c, [&]<typename V>(int64_t cb) {
            V xs[kMaxInputs];
            const V s = FusedSum<V>(op, wd, td, off, cb, xs);
            const V ga = effdet::ActGrad<A>(s, Load<V>(gd + off + cb));
            const V gt = ga / Load<V>(td + cb);
            for (int64_t i = 0; i < n; ++i) {
              Store<V>(dx[i] + off + cb, gt * Load<V>(wd + i * c + cb));
              Store<V>(block.data() + i * c + cb,
                       Load<V>(block.data() + i * c + cb) + ga * (xs[i] - s));
            }
          });
        }
        for (int64_t j = 0; j < width; ++j) d[j] += block[j];
      }
    });
  };
  if (auto e = effdet::WithAct(act, run); e.failure()) return e;
  float* out = sums->typed_data();
  for (int64_t j = 0; j < width; ++j) {
    double s = 0.0;
    for (int64_t k = 0; k < chunks; ++k) s += partial[k * width + j];
    out[j] = static_cast<float>(s);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetFusionAct, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [n, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t [C]
                                  .RemainingArgs()               // x_i
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetFusionActBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [n, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t [C]
                                  .RemainingArgs()               // x_i
                                  .Ret<ffi::Buffer<ffi::F32>>()  // sums
                                  .RemainingRets()               // dx_i
                                  .Attr<int64_t>("act"));
