// The weight gradient of a 2-D convolution (stride 1, no dilation, one
// group, channels last, input channels a multiple of the vector width) as
// one native call, for XLA:CPU through its FFI.
//
// dW[i, j, c, o] = sum_{b, y, x} x[b, y + i - pad_top, x + j - pad_left, c]
//                               dy[b, y, x, o]   (zero outside the input).
//
// XLA:CPU computes it as a convolution with the batch as the contracted
// feature axis, transposing the input and the output gradient into that
// layout first: on the benchmark CNN's second convolution (batch 128, 14x14,
// 32 -> 64 channels) 6.5-7.0 ms, at ~140 GFLOP/s. Here it is a matrix product
// over pixels, dW^T = dy^T patches, a block of pixels at a time: tiles of
// kRows output channels read from dy where it lies, against panels of 64
// patch columns gathered from the input a vector of channels at a time (no
// patch matrix is ever written whole); 4.1-4.4 ms. The images are split
// into a fixed number of groups, one partial gradient each, summed in group
// order at the end, so results repeat exactly whatever the threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nnlib_native;

// Pixels per block: the block's packed patch panel (64 floats a pixel) and
// its rows of dy stay in the core's L2 cache while every tile reads them.
constexpr int64_t kBlockPixels = 256;

// The images are split into this many groups (fewer for a smaller batch),
// each summed into a partial gradient by whichever thread claims it, the
// partials added in group order: the same sums in the same order on any
// machine. (It bounds the threads the call can use to kGroups.)
constexpr int64_t kGroups = 8;

ffi::Error ConvWeightGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                              int64_t pad_top, int64_t pad_left) {
  auto xd = x.dimensions(), gd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("x, dy must be [B, H, W, C], dw [KH, KW, C, F]");
  const int64_t batch = xd[0], height = xd[1], width = xd[2], channels = xd[3];
  const int64_t out_h = gd[1], out_w = gd[2], features = gd[3];
  const int64_t kh = wd[0], kw = wd[1];
  if (gd[0] != batch || wd[2] != channels || wd[3] != features)
    return ffi::Error::InvalidArgument("x, dy and dw sizes disagree");
  if (channels % kVec != 0)
    return ffi::Error::InvalidArgument("channels must be a multiple of the vector width");
  const int64_t rows = kh * kw * channels;  // dW as [rows, features]
  float* out = dw->typed_data();
  const int64_t pixels = out_h * out_w;
  if (batch == 0 || pixels == 0 || rows == 0 || features == 0) {
    std::memset(out, 0, rows * features * sizeof(float));
    return ffi::Error::Success();
  }
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  const int64_t groups = std::min(batch, kGroups);
  AlignedBuffer partial(static_cast<size_t>(groups) * rows * features);
  // The input pixel under tap (i, j) of output pixel (oy, ox), or null in the padding.
  auto pixel_of = [&](int64_t b, int64_t oy, int64_t ox, int64_t i, int64_t j) -> const float* {
    const int64_t iy = oy + i - pad_top, ix = ox + j - pad_left;
    if (iy < 0 || iy >= height || ix < 0 || ix >= width) return nullptr;
    return xp + ((b * height + iy) * width + ix) * channels;
  };
  Phases phases(2);
  // dW^T = dy^T patches: the tiles are output channels, read from dy where
  // it lies; the panels are 64 columns of the patches (64 of the [i, j, c]),
  // gathered a vector of channels at a time.
  const int64_t panels = (rows + kPanel - 1) / kPanel;
  auto job = [&] {
    AlignedBuffer bpack(static_cast<size_t>(kPanel) * kBlockPixels);
    phases.run(0, groups, [&](int64_t g) {
      float* acc = partial.data + g * rows * features;  // [features, rows]
      for (int64_t b = g * batch / groups; b < (g + 1) * batch / groups; ++b)
        for (int64_t p0 = 0; p0 < pixels; p0 += kBlockPixels) {
          const int64_t count = std::min(kBlockPixels, pixels - p0);
          const float* g_rows = gp + (b * pixels + p0) * features;  // [count, features]
          for (int64_t p = 0; p < panels; ++p) {
            const int64_t j0 = p * kPanel, w = std::min<int64_t>(kPanel, rows - j0);
            int64_t tap_i[kPanelVecs], tap_j[kPanelVecs], chan[kPanelVecs];
            for (int v = 0; v < kPanelVecs; ++v) {
              const int64_t r = j0 + v * kVec, tap = r / channels;
              tap_i[v] = r < rows ? tap / kw : -1;
              tap_j[v] = tap % kw;
              chan[v] = r % channels;
            }
            float* panel = bpack.data;
            for (int64_t q = 0, oy = p0 / out_w, ox = p0 % out_w; q < count; ++q) {
              for (int v = 0; v < kPanelVecs; ++v) {
                const float* src =
                    tap_i[v] < 0 ? nullptr : pixel_of(b, oy, ox, tap_i[v], tap_j[v]);
                store(panel + q * kPanel + v * kVec, src ? load(src + chan[v]) : vf{});
              }
              if (++ox == out_w) ox = 0, ++oy;
            }
            if (w == kPanel)
              tiles_product<true, true, true>(g_rows, features, kRows, panel, kPanel, count,
                                              features, acc + j0, rows, w);
            else
              tiles_product<true, false, true>(g_rows, features, kRows, panel, kPanel, count,
                                               features, acc + j0, rows, w);
          }
        }
    });
    // The groups' partial gradients added in group order, transposed back to
    // [rows, features], a tile of rows per claim.
    phases.run(1, (rows + kRows - 1) / kRows, [&](int64_t t) {
      for (int64_t r = t * kRows; r < std::min(rows, (t + 1) * kRows); ++r)
        for (int64_t o = 0; o < features; ++o) {
          float total = 0.0f;
          for (int64_t g = 0; g < groups; ++g)
            total += partial.data[(g * features + o) * rows + r];
          out[r * features + o] = total;
        }
    });
  };
  run_job(pool, job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibConvWeightGradient, ConvWeightGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [B, OH, OW, F]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw [KH, KW, C, F]
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
