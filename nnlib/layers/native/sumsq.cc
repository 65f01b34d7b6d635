// Sums of squares over the last axis of a float32 array: out[r] = sum_j
// x[r, j]^2 (a gradient's squared norm, which a guarded train step forms
// for every leaf before it may update). XLA:CPU reduces a large array as a
// windowed reduction in its YNNPACK library, splitting even a few hundred
// thousand elements over the thread pool; this reads them once at the
// memory's pace on the calling thread, or in chunks shared by the pool's
// threads where a call has at least kParallelMin elements.
//
// A row is summed in chunks of kChunk elements, each over 4 vectors of
// partial sums, and the chunks' sums are added in order: the result is the
// same whatever the threads, and no single float32 partial sums more than
// kChunk / (4 kVec) terms.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nnlib_native;

constexpr int64_t kChunk = 1 << 16;
constexpr int64_t kParallelMin = 1 << 20;

float chunk_sum_of_squares(const float* p, int64_t n) {
  vf acc[4] = {vf{}, vf{}, vf{}, vf{}};
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec)
    for (int v = 0; v < 4; ++v) {
      const vf x = load(p + j + v * kVec);
      acc[v] += x * x;
    }
  for (; j < n; j += kVec) {
    const vf x = load_n(p + j, std::min<int64_t>(kVec, n - j));
    acc[0] += x * x;
  }
  const vf total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float sum = 0.0f;
  for (int i = 0; i < kVec; ++i) sum += total[i];
  return sum;
}

ffi::Error SumOfSquares(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("sum of squares: x needs an axis");
  const int64_t cols = dims.back();
  const int64_t rows = cols == 0 ? out->element_count() : x.element_count() / cols;
  const float* xp = x.typed_data();
  float* op = out->typed_data();
  const int64_t per_row = std::max<int64_t>(1, (cols + kChunk - 1) / kChunk);
  auto chunk = [&](int64_t q) {
    const int64_t r = q / per_row, j0 = q % per_row * kChunk;
    return chunk_sum_of_squares(xp + r * cols + j0, std::min(kChunk, cols - j0));
  };
  std::vector<float> partial(rows * per_row);
  auto fill = [&](int64_t q) { partial[q] = chunk(q); };
  if (rows * cols < kParallelMin) {
    for (int64_t q = 0; q < rows * per_row; ++q) fill(q);
  } else {
    Phases phases(1);
    run_job(pool, [&] { phases.run(0, rows * per_row, fill); });
  }
  for (int64_t r = 0; r < rows; ++r) {
    float sum = 0.0f;
    for (int64_t c = 0; c < per_row; ++c) sum += partial[r * per_row + c];
    op[r] = sum;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibSumOfSquares, SumOfSquares,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., n]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [...]
