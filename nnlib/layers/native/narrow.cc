// Float32 products with one narrow side (at most kNarrow columns: a
// classifier head's width), in one call on the calling thread. The three
// products of such a dense layer, by `mode`:
//   0: C[m, n] = A[m, k] B[k, n]      (the forward pass, x W)
//   1: C[m, k] = A[m, n] B[k, n]^T    (the input gradient, dy W^T)
//   2: C[k, n] = A[m, k]^T B[m, n]    (the weight gradient, x^T dy)
// n <= kNarrow throughout. At these sizes (a few million multiply-adds) XLA:CPU
// hands each product to a library that splits it over the thread pool, and
// the hand-over and the wait for the second thread cost more than the
// arithmetic; one thread here runs each in tens of microseconds.
//
// Modes 0 and 2 contract into n columns: the narrow operand B is copied into
// rows of whole vectors (zero past n), and each tile of kNarrowRows rows of C
// stays in registers over the contraction, one multiply-add per row per step
// against one load of B's row. Mode 1 contracts over the n columns into a
// wide C: W^T (n rows of k) is copied once into whole 64-column panels and
// the register-tiled product of common.h runs over it. Each element's sum
// runs over the contraction in order, so results repeat exactly.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nnlib_native;

constexpr int64_t kNarrow = 16;
constexpr int kNarrowVecs = (kNarrow + kVec - 1) / kVec;  // 1 (AVX-512), 2 (AVX2)
constexpr int kNarrowRows = kNarrowVecs == 1 ? 12 : 6;    // 12 accumulators either way

// C[0:R, 0:n] = sum_k A(r, k) Bp[k, :], A(r, k) = a[k lda + r] (kAByK) or
// a[r lda + k]; Bp rows of kNarrowVecs vectors; C with row stride ldc.
template <int R, bool kAByK>
inline void narrow_tile(const float* a, int64_t lda, const float* bp, int64_t k_size,
                        float* c, int64_t ldc, int64_t n) {
  vf acc[R][kNarrowVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kNarrowVecs; ++v) acc[r][v] = vf{};
  for (int64_t k = 0; k < k_size; ++k) {
    vf bv[kNarrowVecs];
    for (int v = 0; v < kNarrowVecs; ++v) bv[v] = load(bp + k * kNarrowVecs * kVec + v * kVec);
    for (int r = 0; r < R; ++r) {
      const vf av = splat(kAByK ? a[k * lda + r] : a[r * lda + k]);
      for (int v = 0; v < kNarrowVecs; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kNarrowVecs; ++v) {
      const int64_t w = std::clamp<int64_t>(n - v * kVec, 0, kVec);
      if (w > 0) store_n(c + r * ldc + v * kVec, acc[r][v], w);
    }
}

// All `rows` rows of C, a tile at a time; A's tile t starts at a + t stride.
template <bool kAByK>
void narrow_rows(const float* a, int64_t lda, int64_t stride, const float* bp, int64_t k_size,
                 int64_t rows, float* c, int64_t ldc, int64_t n) {
  int64_t r = 0;
  for (; r + kNarrowRows <= rows; r += kNarrowRows)
    narrow_tile<kNarrowRows, kAByK>(a + r * stride, lda, bp, k_size, c + r * ldc, ldc, n);
  for (; r + 4 <= rows; r += 4)
    narrow_tile<4, kAByK>(a + r * stride, lda, bp, k_size, c + r * ldc, ldc, n);
  for (; r < rows; ++r)
    narrow_tile<1, kAByK>(a + r * stride, lda, bp, k_size, c + r * ldc, ldc, n);
}

// b [rows, n] into dst [rows, kNarrowVecs kVec], zero past n.
void pack_narrow(const float* b, int64_t rows, int64_t n, float* dst) {
  const int64_t width = kNarrowVecs * kVec;
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(dst + i * width, b + i * n, n * sizeof(float));
    std::memset(dst + i * width + n, 0, (width - n) * sizeof(float));
  }
}

ffi::Error NarrowMatmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::ResultBuffer<ffi::F32> c, int64_t mode) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2)
    return ffi::Error::InvalidArgument("narrow matmul operands must be matrices");
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* cp = c->typed_data();
  if (mode == 0 || mode == 2) {
    // 0: A [m, k], B [k, n] -> C [m, n]; 2: A [m, k], B [m, n] -> C [k, n].
    const int64_t n = db[1], depth = db[0];
    const int64_t rows = mode == 0 ? da[0] : da[1];
    if (n > kNarrow || (mode == 0 ? da[1] : da[0]) != depth)
      return ffi::Error::InvalidArgument("narrow matmul: operand sizes do not match");
    if (rows * n == 0) return ffi::Error::Success();
    AlignedBuffer packed(static_cast<size_t>(std::max<int64_t>(depth, 1)) * kNarrowVecs * kVec);
    pack_narrow(bp, depth, n, packed.data);
    if (mode == 0)
      narrow_rows<false>(ap, da[1], da[1], packed.data, depth, rows, cp, n, n);
    else
      narrow_rows<true>(ap, da[1], 1, packed.data, depth, rows, cp, n, n);
    return ffi::Error::Success();
  }
  if (mode != 1) return ffi::Error::InvalidArgument("narrow matmul: mode must be 0, 1 or 2");
  // A [m, n], B [k, n] -> C [m, k]: W^T into [n, panels kPanel], zero past k.
  const int64_t m = da[0], n = da[1], k_size = db[0];
  if (db[1] != n || n > kNarrow)
    return ffi::Error::InvalidArgument("narrow matmul: operand sizes do not match");
  if (m * k_size == 0) return ffi::Error::Success();
  if (n == 0) {
    std::memset(cp, 0, m * k_size * sizeof(float));
    return ffi::Error::Success();
  }
  const int64_t panels = (k_size + kPanel - 1) / kPanel, ldt = panels * kPanel;
  AlignedBuffer transposed(static_cast<size_t>(n) * ldt);  // zeroed
  for (int64_t j = 0; j < k_size; ++j)
    for (int64_t i = 0; i < n; ++i) transposed.data[i * ldt + j] = bp[j * n + i];
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j0 = p * kPanel, w = std::min<int64_t>(kPanel, k_size - j0);
    if (w == kPanel)
      tiles_product<false, true, false>(ap, n, kRows * n, transposed.data + j0, ldt, n, m,
                                        cp + j0, k_size, w);
    else
      tiles_product<false, false, false>(ap, n, kRows * n, transposed.data + j0, ldt, n, m,
                                         cp + j0, k_size, w);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibNarrowMatmul, NarrowMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c
                                  .Attr<int64_t>("mode"));
