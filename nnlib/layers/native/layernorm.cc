// LayerNorm's backward pass as one native call, for XLA:CPU through its FFI.
//
// The forward pass stays in XLA, which fuses it with its neighbours. The
// backward, written as XLA operations, is several reductions over the rows
// and the columns that XLA:CPU runs as separate passes (nine of them took
// ~16 ms of the benchmark GPT's train step, PyTorch's native kernel ~3). Here
// each chunk of rows is read once: the row statistics are recomputed, the
// input gradient written, and the chunk's column sums for the scale and bias
// gradients kept; the chunks' sums are added at the end.
//
// Math (rows of F features, float32): xhat = (x - mean) rstd,
// rstd = 1 / sqrt(var + eps) (two-pass variance), g = dy * scale:
//   dx = rstd (g - mean(g) - xhat mean(g xhat)),
//   dscale = sum_rows dy xhat,  dbias = sum_rows dy.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nnlib_native;

constexpr int64_t kChunkRows = 32;

inline float total(vf v) {
  float s = 0.0f;
  for (int u = 0; u < kVec; ++u) s += v[u];
  return s;
}

ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> ct_y,
                             ffi::ResultBuffer<ffi::F32> ct_x,
                             ffi::ResultBuffer<ffi::F32> ct_scale,
                             ffi::ResultBuffer<ffi::F32> ct_bias, float epsilon) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("x must have a features axis");
  const int64_t features = dims.back();
  const int64_t rows = features == 0 ? 0 : static_cast<int64_t>(x.element_count()) / features;
  float* dscale = ct_scale->typed_data();
  float* dbias = ct_bias->typed_data();
  std::memset(dscale, 0, features * sizeof(float));
  std::memset(dbias, 0, features * sizeof(float));
  if (rows == 0 || features == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* sp = scale.typed_data();
  const float* gp = ct_y.typed_data();
  float* dxp = ct_x->typed_data();
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int64_t ldf = (features + kVec - 1) / kVec * kVec;
  // Column sums per chunk: [chunks, 2, ldf] (dscale then dbias).
  AlignedBuffer partial(static_cast<size_t>(chunks) * 2 * ldf);
  const float inv_f = 1.0f / static_cast<float>(features);
  Phases phases(2);
  auto job = [&] {
    AlignedBuffer xhat(ldf);
    phases.run(0, chunks, [&](int64_t chunk) {
      float* ps = partial.data + chunk * 2 * ldf;
      float* pb = ps + ldf;
      const int64_t r1 = std::min(rows, (chunk + 1) * kChunkRows);
      for (int64_t r = chunk * kChunkRows; r < r1; ++r) {
        const float* xr = xp + r * features;
        const float* gr = gp + r * features;
        float* dr = dxp + r * features;
        vf acc = vf{};
        for (int64_t f = 0; f < features; f += kVec)
          acc += load_n(xr + f, std::min<int64_t>(kVec, features - f));
        const float mean = total(acc) * inv_f;
        acc = vf{};
        for (int64_t f = 0; f < features; f += kVec) {
          const int64_t n = std::min<int64_t>(kVec, features - f);
          vf d = load_n(xr + f, n) - splat(mean);
          if (n < kVec) d = load_n(reinterpret_cast<const float*>(&d), n);  // zero the tail
          acc += d * d;
        }
        const float rstd = 1.0f / std::sqrt(total(acc) * inv_f + epsilon);
        vf sum_g = vf{}, sum_gx = vf{};
        for (int64_t f = 0; f < features; f += kVec) {
          const int64_t n = std::min<int64_t>(kVec, features - f);
          const vf xh = (load_n(xr + f, n) - splat(mean)) * splat(rstd);
          const vf dy = load_n(gr + f, n);
          const vf g = dy * load_n(sp + f, n);  // zero past n
          store(xhat.data + f, xh);
          sum_g += g;
          sum_gx += g * xh;
          store(ps + f, load(ps + f) + dy * xh);
          store(pb + f, load(pb + f) + dy);
        }
        const vf mg = splat(total(sum_g) * inv_f), mgx = splat(total(sum_gx) * inv_f);
        for (int64_t f = 0; f < features; f += kVec) {
          const int64_t n = std::min<int64_t>(kVec, features - f);
          const vf g = load_n(gr + f, n) * load_n(sp + f, n);
          store_n(dr + f, splat(rstd) * (g - mg - load(xhat.data + f) * mgx), n);
        }
      }
    });
    // The chunks' column sums, a block of columns per claim.
    const int64_t blocks = ldf / kVec;
    phases.run(1, blocks, [&](int64_t block) {
      const int64_t f = block * kVec;
      vf s = vf{}, b = vf{};
      for (int64_t c = 0; c < chunks; ++c) {
        s += load(partial.data + c * 2 * ldf + f);
        b += load(partial.data + c * 2 * ldf + ldf + f);
      }
      const int64_t n = std::min<int64_t>(kVec, features - f);
      store_n(dscale + f, s, n);
      store_n(dbias + f, b, n);
    });
  };
  run_job(pool, job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_y [..., F]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_x [..., F]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_scale [F]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_bias [F]
                                  .Attr<float>("epsilon"));
