// Summed sigmoid focal loss of one level and its gradient, in one pass (f32).
//
// The loss is elementwise over the class logits [B, H, W, A*C] (35M values
// for D0 at 512, batch 8) and bound by its transcendentals: XLA:CPU split
// the jnp form (effdet_jax/detection/focal.py) into four or five fusions
// per direction, recomputing exp and log1p in each. Here each logit is read
// once and its loss term and its derivative come from one exp, one log and
// one exp for the modulating factor (for gamma 1.5 and 2, the defaults of
// the official configs, s * sqrt(s) and s * s instead: the kernel is bound
// by its transcendentals); the gradient is written for the backward pass
// to scale by the loss's cotangent. Both come out multiplied by a given
// scale (the loss normaliser), so that in training the cotangent is the
// constant 1 that XLA folds away, not a pass over the gradient per level.
//
// Per logit x with z = -x for the anchor's class, z = x otherwise:
//   e = exp(-|z|), softplus(z) = max(z, 0) + log1p(e),
//   s = sigmoid(z), log s = min(z, 0) - log1p(e), m = exp(gamma log s),
//   loss = alpha_t m softplus(z),
//   dloss/dx = sign alpha_t m (gamma (1 - s) softplus(z) + s).
// The loss is summed per fixed chunk of anchors in double and the chunks
// added in order (cpu_common.h): the same bits whatever the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
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

// alpha_t for positives and negatives, times the caller's scale (the loss
// normaliser): the loss terms and the gradient come out scaled for free.
struct Constants {
  float alpha_pos, alpha_neg, gamma;
};

// How the modulating factor m = s^gamma is computed.
enum class Power { kGeneral, kOneAndAHalf, kTwo };

inline V16 Sqrt(V16 x) {
#ifdef __AVX512F__
  return reinterpret_cast<V16>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x)));
#else
  for (int i = 0; i < 16; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}
inline V8 Sqrt(V8 x) {
#ifdef __AVX__
  return reinterpret_cast<V8>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#else
  for (int i = 0; i < 8; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

using effdet::Exp;

// log1p(e) for e in (0, 1], given r = 1 / (1 + e): log of the rounded
// u = 1 + e, plus the first-order correction for the rounding, (e - (u -
// 1)) / u, so small e keep full precision without a division.
template <typename V>
inline V Log1pUnit(V e, V r) {
  const V u = 1.f + e;
  return effdet::LogOneToTwo(u) + (e - (u - 1.f)) * r;
}

template <typename V>
inline V Select(decltype(V{} < V{}) mask, V a, V b) {
  return mask ? a : b;
}

// Loss terms of one vector of logits; `positive` marks the anchor's class.
template <Power P, typename V, typename M>
inline V Term(V x, M positive, const Constants& k, V* grad) {
  const V z = Select<V>(positive, -x, x);
  const V zero = Splat<V>(0.f);
  const V e = Exp(Select<V>(z > zero, -z, z));
  const V r = 1.f / (1.f + e);
  const V l1p = Log1pUnit(e, r);
  const V sp = Select<V>(z > zero, z, zero) + l1p;
  const V s = Select<V>(z >= zero, r, e * r);
  V m;
  if constexpr (P == Power::kOneAndAHalf) {
    m = s * Sqrt(s);
  } else if constexpr (P == Power::kTwo) {
    m = s * s;
  } else {
    const V log_s = Select<V>(z < zero, z, zero) - l1p;
    m = Exp(k.gamma * log_s);
  }
  const V alpha_t = Select<V>(positive, Splat<V>(k.alpha_pos),
                              Splat<V>(k.alpha_neg));
  const V am = alpha_t * m;
  const V dz = am * (k.gamma * (1.f - s) * sp + s);
  *grad = Select<V>(positive, -dz, dz);
  return am * sp;
}

// One anchor's C logits: gradients to `g`, loss terms added to `acc`.
// The last C mod 8 classes go through one 8-wide vector too (padded, the
// padding's terms dropped): a scalar exp and log1p per logit cost more.
template <Power P>
void Anchor(const float* x, int32_t id, int64_t c, const Constants& k,
            float* g, V16* acc) {
  const I16 iota16 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const I8 iota8 = {0, 1, 2, 3, 4, 5, 6, 7};
  int64_t cb = 0;
  for (; cb + 16 <= c; cb += 16) {
    V16 grad;
    const auto positive = (iota16 + static_cast<int32_t>(cb)) == id;
    *acc += Term<P, V16>(Load<V16>(x + cb), positive, k, &grad);
    Store<V16>(g + cb, grad);
  }
  V8 acc8 = Splat<V8>(0.f);
  for (; cb < c; cb += 8) {
    const int64_t n = std::min<int64_t>(8, c - cb);
    V8 v = Splat<V8>(0.f), grad;
    __builtin_memcpy(&v, x + cb, n * sizeof(float));
    const auto positive = (iota8 + static_cast<int32_t>(cb)) == id;
    const V8 term = Term<P, V8>(v, positive, k, &grad);
    acc8 += iota8 < static_cast<int32_t>(n) ? term : Splat<V8>(0.f);
    __builtin_memcpy(g + cb, &grad, n * sizeof(float));
  }
  for (int i = 0; i < 8; ++i) (*acc)[i] += acc8[i];
}

// Anchors between flushes of the float accumulator into the double sum.
constexpr int64_t kFlushAnchors = 64;

// Vectors between flushes on the flat path (about as many terms per lane).
constexpr int64_t kFlushVectors = 4096;

// n <= 16 lanes of a gradient vector; whole ones streamed with `stream`
// (gradients over kStreamBytes: the class predict's backward reads them
// back from memory anyway).
inline void StoreFirst(float* p, V16 v, int64_t n, bool stream) {
  if (n < 16) {
    effdet::StorePartial(p, v, n);
  } else if (stream) {
    effdet::StreamStore(p, v);
  } else {
    Store<V16>(p, v);
  }
}

// Anchors [a_lo, a_hi) as one flat run of their logits, in 16-lane vectors
// aligned to the buffer (a vector may hold the end of one anchor and the
// start of the next: num_classes >= 16, so never more than two). Every
// vector is whole but the run's first and last: no 8-wide tail per anchor
// (810 = 50 x 16 + 10), and aligned gradient stores that can stream.
template <Power P>
double FlatRun(const float* x, const int32_t* id, int64_t c, int64_t a_lo,
               int64_t a_hi, const Constants& k, float* g, bool stream) {
  const I16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t hi = a_hi * c;
  int64_t a = a_lo;              // the anchor of the vector's first lane
  int64_t next = (a_lo + 1) * c; // the first logit of anchor a + 1
  double sum = 0.0;
  V16 acc = Splat<V16>(0.f);
  int64_t pending = 0;
  for (int64_t i = a_lo * c; i < hi;) {
    const int64_t end = std::min(hi, (i / 16 + 1) * 16);
    const int64_t n = end - i;
    // The positive lanes: anchor a's class and, past `next`, anchor a+1's
    // (a negative id, background or ignored, matches no lane).
    const int64_t pa = id[a] >= 0 ? a * c + id[a] - i : -1;
    const int64_t pb =
        end > next && id[a + 1] >= 0 ? next + id[a + 1] - i : -1;
    const auto positive = (iota == static_cast<int32_t>(pa < 16 ? pa : -1)) |
                          (iota == static_cast<int32_t>(pb < 16 ? pb : -1));
    V16 grad;
    const V16 term = Term<P, V16>(effdet::LoadLanes(x + i, n), positive, k, &grad);
    acc += n == 16 ? term : (iota < static_cast<int32_t>(n) ? term
                                                            : Splat<V16>(0.f));
    StoreFirst(g + i, grad, n, stream);
    if (end >= next) {
      ++a;
      next += c;
    }
    i = end;
    if (++pending == kFlushVectors || i == hi) {
      for (int l = 0; l < 16; ++l) sum += acc[l];
      acc = Splat<V16>(0.f);
      pending = 0;
    }
  }
  return sum;
}

ffi::Error FocalLoss(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                     ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> scale,
                     ffi::ResultBuffer<ffi::F32> loss,
                     ffi::ResultBuffer<ffi::F32> grad, int64_t num_classes,
                     float alpha, float gamma) {
  const int64_t anchors = ids.element_count();
  if (num_classes < 1 || anchors * num_classes != logits.element_count() ||
      scale.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "focal loss: logits must hold num_classes values per class id, "
        "one scale");
  }
  const float sc = *scale.typed_data();
  const Constants k{alpha * sc, (1.f - alpha) * sc, gamma};
  const float* x = logits.typed_data();
  const int32_t* id = ids.typed_data();
  float* g = grad->typed_data();
  const int64_t chunks =
      std::max<int64_t>(std::min(anchors, effdet::kReduceChunks), 1);
  std::vector<double> partial(chunks, 0.0);
  const bool flat = num_classes >= 16;
  const bool stream = anchors * num_classes * 4 >= effdet::kStreamBytes &&
                      reinterpret_cast<uintptr_t>(g) % 64 == 0;
  auto anchor = k.gamma == 1.5f ? Anchor<Power::kOneAndAHalf>
                : k.gamma == 2.f ? Anchor<Power::kTwo>
                                 : Anchor<Power::kGeneral>;
  auto run = k.gamma == 1.5f ? FlatRun<Power::kOneAndAHalf>
             : k.gamma == 2.f ? FlatRun<Power::kTwo>
                              : FlatRun<Power::kGeneral>;
  effdet::ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t lo = effdet::ChunkStart(anchors, chunks, chunk);
    const int64_t hi = effdet::ChunkStart(anchors, chunks, chunk + 1);
    if (flat) {
      partial[chunk] = run(x, id, num_classes, lo, hi, k, g, stream);
      if (stream) effdet::StreamFence();
      return;
    }
    double sum = 0.0;
    V16 acc = Splat<V16>(0.f);
    int64_t pending = 0;
    for (int64_t a = lo; a < hi; ++a) {
      anchor(x + a * num_classes, id[a], num_classes, k, g + a * num_classes,
             &acc);
      if (++pending == kFlushAnchors || a + 1 == hi) {
        for (int i = 0; i < 16; ++i) sum += acc[i];
        acc = Splat<V16>(0.f);
        pending = 0;
      }
    }
    partial[chunk] = sum;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  *loss->typed_data() = static_cast<float>(total);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffdetFocalLoss, FocalLoss,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits
                                  .Arg<ffi::Buffer<ffi::S32>>()  // class ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // loss sum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gradient
                                  .Attr<int64_t>("num_classes")
                                  .Attr<float>("alpha")
                                  .Attr<float>("gamma"));
