// Sums of squares over the last axis of float32 arrays: out[r, i] = sum_j
// x_i[r, j]^2 (gradients' squared norms, which a guarded train step forms
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

// Every argument x_i [..., n_i] (the same rows R = size / n_i in each: 1,
// or a vmapped batch) into out [R, k], out[r, i] = sum_j x_i[r, j]^2: one
// call for all of a step's gradient leaves, chunks of all of them shared by
// the threads where there are at least kParallelMin elements in all.
ffi::Error SumsOfSquares(ffi::ThreadPool pool, ffi::RemainingArgs args,
                         ffi::ResultBuffer<ffi::F32> out) {
  const int64_t k = static_cast<int64_t>(args.size());
  if (k == 0) return ffi::Error::Success();
  const int64_t rows = out->element_count() / k;
  struct Leaf {
    const float* data;
    int64_t cols, per_row, first;  // first: the leaf's first chunk
  };
  std::vector<Leaf> leaves;
  int64_t chunks = 0, elements = 0;
  for (int64_t i = 0; i < k; ++i) {
    auto x = args.get<ffi::Buffer<ffi::F32>>(i);
    if (!x.has_value()) return x.error();
    auto dims = x->dimensions();
    const int64_t cols = dims.size() == 0 ? 1 : dims.back();
    if (cols * rows != static_cast<int64_t>(x->element_count()))
      return ffi::Error::InvalidArgument("sums of squares: every argument needs the same rows");
    const int64_t per_row = std::max<int64_t>(1, (cols + kChunk - 1) / kChunk);
    leaves.push_back({x->typed_data(), cols, per_row, chunks});
    chunks += rows * per_row;
    elements += rows * cols;
  }
  std::vector<float> partial(chunks);
  auto fill = [&](int64_t q) {
    // The leaf holding chunk q: the last whose first chunk is at most q.
    const Leaf& leaf = *(std::upper_bound(leaves.begin(), leaves.end(), q,
                                          [](int64_t v, const Leaf& l) { return v < l.first; }) - 1);
    const int64_t local = q - leaf.first, r = local / leaf.per_row;
    const int64_t j0 = local % leaf.per_row * kChunk;
    partial[q] = chunk_sum_of_squares(leaf.data + r * leaf.cols + j0,
                                      std::min(kChunk, leaf.cols - j0));
  };
  if (elements < kParallelMin) {
    for (int64_t q = 0; q < chunks; ++q) fill(q);
  } else {
    Phases phases(1);
    run_job(pool, [&] { phases.run(0, chunks, fill); });
  }
  float* op = out->typed_data();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t r = 0; r < rows; ++r) {
      float sum = 0.0f;
      const float* p = partial.data() + leaves[i].first + r * leaves[i].per_row;
      for (int64_t c = 0; c < leaves[i].per_row; ++c) sum += p[c];
      op[r * k + i] = sum;
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibSumsOfSquares, SumsOfSquares,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()                 // x_i [..., n_i]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [rows, k]
