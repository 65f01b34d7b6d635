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

// ------------------------------------------------- few taps (an image's first layer) --
//
// With few input channels (1 for a grey image, 3 for RGB) the patches above
// are gathered a float at a time, slower than XLA (2.1 ms against 1.1-1.3 on
// the benchmark CNN's first layer, which XLA computes as a transposing copy
// of dy and a convolution over the batch). With few taps T = KH * KW * C
// (at most 49) the whole gradient [T, F] fits in registers a block at a
// time: each output pixel's row of dy (a vector or two of features) is read
// once and multiplied by the T input values under the taps, broadcast from
// the input where it lies. The input comes padded (by XLA, a small copy), so
// no tap falls outside it.

// Taps per register tile: kTapBlock x kFeatureVecs accumulators, with the
// row of dy and a broadcast input value, within the 32 (AVX-512) or 16 (AVX2)
// vector registers.
#if defined(__AVX512F__)
constexpr int kTapBlock = 12;
#else
constexpr int kTapBlock = 6;
#endif
constexpr int kFeatureVecs = 2;

// acc[t][v] += x[pixel + offsets[t]] * dy[pixel, v] over `pixels` pixels of
// one output row (consecutive in x with stride `channels`, in dy with stride
// `features`), then added into out (row stride `features`), w valid features.
template <int TT, bool kFull>
void taps_tile(const float* x, const int64_t* offsets, int64_t channels, const float* g,
               int64_t features, int64_t pixels, float* out, int64_t w) {
  vf acc[TT][kFeatureVecs];
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < kFeatureVecs; ++v) acc[t][v] = vf{};
  for (int64_t q = 0; q < pixels; ++q, x += channels, g += features) {
    vf gv[kFeatureVecs];
    for (int v = 0; v < kFeatureVecs; ++v)
      gv[v] = kFull ? load(g + v * kVec)
                    : load_n(g + v * kVec, std::clamp<int64_t>(w - v * kVec, 0, kVec));
    for (int t = 0; t < TT; ++t) {
      const vf xv = splat(x[offsets[t]]);
      for (int v = 0; v < kFeatureVecs; ++v) acc[t][v] += xv * gv[v];
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < kFeatureVecs; ++v) {
      const int64_t n = std::clamp<int64_t>(w - v * kVec, 0, kVec);
      if (n > 0) store_n(out + t * features + v * kVec,
                         load_n(out + t * features + v * kVec, n) + acc[t][v], n);
    }
}

template <bool kFull>
void taps_tiles(int tt, const float* x, const int64_t* offsets, int64_t channels,
                const float* g, int64_t features, int64_t pixels, float* out, int64_t w) {
  switch (tt) {
#define NNLIB_TAPS(T) \
  case T: taps_tile<T, kFull>(x, offsets, channels, g, features, pixels, out, w); break;
    NNLIB_TAPS(1) NNLIB_TAPS(2) NNLIB_TAPS(3) NNLIB_TAPS(4) NNLIB_TAPS(5) NNLIB_TAPS(6)
    NNLIB_TAPS(7) NNLIB_TAPS(8) NNLIB_TAPS(9) NNLIB_TAPS(10) NNLIB_TAPS(11) NNLIB_TAPS(12)
#undef NNLIB_TAPS
  }
}

ffi::Error ConvWeightGradientTaps(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), gd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("x, dy must be [B, H, W, C], dw [KH, KW, C, F]");
  const int64_t batch = xd[0], height = xd[1], width = xd[2], channels = xd[3];
  const int64_t out_h = gd[1], out_w = gd[2], features = gd[3];
  const int64_t kh = wd[0], kw = wd[1], taps = kh * kw * channels;
  if (gd[0] != batch || wd[2] != channels || wd[3] != features ||
      height != out_h + kh - 1 || width != out_w + kw - 1)
    return ffi::Error::InvalidArgument("x (padded), dy and dw sizes disagree");
  float* out = dw->typed_data();
  const int64_t groups = std::min(batch, kGroups);
  if (groups == 0 || out_h * out_w == 0 || taps == 0 || features == 0) {
    std::memset(out, 0, taps * features * sizeof(float));
    return ffi::Error::Success();
  }
  std::unique_ptr<int64_t[]> offsets(new int64_t[taps]);  // tap (i, j, c) from a pixel
  for (int64_t i = 0, t = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t c = 0; c < channels; ++c) offsets[t++] = (i * width + j) * channels + c;
  // Tap blocks of (nearly) equal sizes up to kTapBlock; feature blocks of
  // kFeatureVecs vectors. One chunk: a group of images, each output row
  // multiplied by every block pair while its row of dy is in the L1 cache.
  const int64_t tap_blocks = (taps + kTapBlock - 1) / kTapBlock;
  const int64_t block_width = kFeatureVecs * kVec;
  AlignedBuffer partial(static_cast<size_t>(groups) * taps * features);
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  Phases phases(2);
  auto job = [&] {
    phases.run(0, groups, [&](int64_t g) {
      for (int64_t b = g * batch / groups; b < (g + 1) * batch / groups; ++b)
        for (int64_t oy = 0; oy < out_h; ++oy) {
          const float* xrow = xp + ((b * height + oy) * width) * channels;
          const float* grow = gp + ((b * out_h + oy) * out_w) * features;
          for (int64_t tb = 0; tb < tap_blocks; ++tb) {
            const int64_t t0 = tb * taps / tap_blocks, tt = (tb + 1) * taps / tap_blocks - t0;
            for (int64_t f0 = 0; f0 < features; f0 += block_width) {
              const int64_t w = std::min(block_width, features - f0);
              float* acc = partial.data + (g * taps + t0) * features + f0;
              if (w == block_width)
                taps_tiles<true>(int(tt), xrow, offsets.get() + t0, channels, grow + f0,
                                 features, out_w, acc, w);
              else
                taps_tiles<false>(int(tt), xrow, offsets.get() + t0, channels, grow + f0,
                                  features, out_w, acc, w);
            }
          }
        }
    });
    // The groups' partial gradients added in group order.
    const int64_t n = taps * features, chunk = 1024;
    phases.run(1, (n + chunk - 1) / chunk, [&](int64_t c) {
      for (int64_t k = c * chunk; k < std::min(n, (c + 1) * chunk); ++k) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; ++g) total += partial.data[g * n + k];
        out[k] = total;
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibConvWeightGradientTaps, ConvWeightGradientTaps,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x, padded [B, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [B, H-KH+1, W-KW+1, F]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dw [KH, KW, C, F]
