// Shared by nnlib's native CPU kernels (lstm.cc, attention.cc, layernorm.cc):
// vectors and their transcendental functions, the register-blocked matmul
// microkernels, and how a call spreads its work over XLA's thread pool.
//
// Vectors are GCC's vector extensions, so the same code compiles to AVX-512
// (16 floats), AVX2 (8) or whatever -march=native offers.

#ifndef NNLIB_NATIVE_COMMON_H_
#define NNLIB_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace nnlib_native {


// ---------------------------------------------------------------- vectors --
#if defined(__AVX512F__)
constexpr int kVec = 16;  // floats per vector
constexpr int kPanelVecs = 4;  // a panel is 64 columns
constexpr int kRows = 6;  // rows of the microkernel: 24 accumulators of 32
#else
constexpr int kVec = 8;
constexpr int kPanelVecs = 2;  // 16 columns
constexpr int kRows = 6;  // 12 accumulators of 16 (AVX2)
#endif
constexpr int kPanel = kVec * kPanelVecs;

typedef float vf __attribute__((vector_size(kVec * 4)));
typedef float vfu __attribute__((vector_size(kVec * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kVec * 4)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// x in every lane. (Not vf{} + x: -0 + 0 = +0, so the compiler must keep
// that addition, an extra instruction per broadcast on the FMA ports, which
// cost the matmul microkernel ~20 % of its speed.)
inline vf splat(float x) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_set1_ps(x));
#elif defined(__AVX__)
  return reinterpret_cast<vf>(_mm256_set1_ps(x));
#else
  vf v;
  for (int i = 0; i < kVec; ++i) v[i] = x;
  return v;
#endif
}
// n <= kVec floats: a whole vector, or a tail through a zeroed scratch.
inline vf load_n(const float* p, int64_t n) {
  if (n == kVec) return load(p);
  alignas(64) float tmp[kVec] = {};
  std::memcpy(tmp, p, n * sizeof(float));
  return load(tmp);
}
inline void store_n(float* p, vf v, int64_t n) {
  if (n == kVec) {
    store(p, v);
    return;
  }
  alignas(64) float tmp[kVec];
  store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(float));
}
// dst[0:n] += src[0:n].
inline void add_into(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t m = std::min<int64_t>(kVec, n - i);
    store_n(dst + i, load_n(dst + i, m) + load_n(src + i, m), m);
  }
}
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x) for x in [-87.3, 88] (clamped), Cephes' expf: a degree-5
// polynomial after reducing by n ln 2; within 2 ulp of the exact value. The
// upper bound keeps n <= 127: at 88.7, n = 128 made the scale 2^128 = inf,
// and a sigmoid of -88.7 then 0 * inf = NaN in the reciprocal's Newton step.
inline vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.0f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: rounds to an integer
  vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// 1 / d: the CPU's reciprocal estimate and one Newton step where AVX-512 has
// it (2^-14, then within 2 ulp), a division elsewhere.
inline vf vrecip(vf d) {
#if defined(__AVX512F__)
  vf r = reinterpret_cast<vf>(_mm512_rcp14_ps(reinterpret_cast<__m512>(d)));
  return r * (splat(2.0f) - d * r);
#else
  return splat(1.0f) / d;
#endif
}

inline vf vsigmoid(vf x) { return vrecip(splat(1.0f) + vexp(-x)); }

// tanh: Cephes' tanhf polynomial below |x| = 0.625, 1 - 2 / (e^{2|x|} + 1)
// above (no cancellation there), with the sign put back.
inline vf vtanh(vf x) {
  vf ax = vmax(x, -x);
  vf x2 = x * x;
  vf p = splat(-5.70498872745e-3f);
  p = p * x2 + splat(2.06390887954e-2f);
  p = p * x2 + splat(-5.37397155531e-2f);
  p = p * x2 + splat(1.33314422036e-1f);
  p = p * x2 + splat(-3.33332819422e-1f);
  vf small = p * x2 * x + x;
  vf big = splat(1.0f) - splat(2.0f) * vrecip(vexp(ax + ax) + splat(1.0f));
  big = x < splat(0.0f) ? -big : big;
  return ax < splat(0.625f) ? small : big;
}

// ------------------------------------------------------------ the product --
// C[0:R, 0:w] (+)= sum_k A[0:R, k] B[k, 0:kPanel]: A read as a[k lda + r]
// (kAByK: a packed tile [K, kRows] with lda = kRows, or a transposed matrix)
// or as a[r lda + k] (a row-major matrix in place); B as b[k ldb + j]
// (a packed panel [K, kPanel] with ldb = kPanel, or a row-major matrix in
// place, whole panels only); C with row stride ldc. kLoad adds to C (else
// overwrites it); kFull: w = kPanel, else the columns from w on are neither
// read nor written. The tile stays in registers over all of K.
template <int R, bool kLoad, bool kFull, bool kAByK>
inline void tile_product(const float* a, int64_t lda, const float* b, int64_t ldb,
                         int64_t k_size, float* c, int64_t ldc, int64_t w) {
  vf acc[R][kPanelVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v)
      acc[r][v] = !kLoad ? vf{}
                  : kFull ? load(c + r * ldc + v * kVec)
                          : load_n(c + r * ldc + v * kVec,
                                   std::clamp<int64_t>(w - v * kVec, 0, kVec));
  for (int64_t k = 0; k < k_size; ++k, b += ldb) {
    vf bv[kPanelVecs];
    for (int v = 0; v < kPanelVecs; ++v) bv[v] = load(b + v * kVec);
    for (int r = 0; r < R; ++r) {
      const vf av = splat(kAByK ? a[k * lda + r] : a[r * lda + k]);
      for (int v = 0; v < kPanelVecs; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v) {
      if (kFull) {
        store(c + r * ldc + v * kVec, acc[r][v]);
      } else {
        const int64_t n = std::clamp<int64_t>(w - v * kVec, 0, kVec);
        if (n > 0) store_n(c + r * ldc + v * kVec, acc[r][v], n);
      }
    }
}

// tile_product over `rows` rows of A, kRows at a time, against one panel of
// B: C[0:rows, 0:w] (+)= A B. Row tiles of A are `tile_stride` floats apart
// (kRows lda for a row-major A, kRows for a transposed one, K kRows for
// packed tiles).
template <bool kLoad, bool kFull, bool kAByK>
void tiles_product(const float* a, int64_t lda, int64_t tile_stride, const float* b,
                   int64_t ldb, int64_t k_size, int64_t rows, float* c, int64_t ldc, int64_t w) {
  for (int64_t j = 0; j < rows; j += kRows, a += tile_stride, c += kRows * ldc) {
    switch (std::min<int64_t>(kRows, rows - j)) {
#define NNLIB_TILE(R) tile_product<R, kLoad, kFull, kAByK>(a, lda, b, ldb, k_size, c, ldc, w)
      case kRows: NNLIB_TILE(kRows); break;
      case 5: NNLIB_TILE(5); break;
      case 4: NNLIB_TILE(4); break;
      case 3: NNLIB_TILE(3); break;
      case 2: NNLIB_TILE(2); break;
      default: NNLIB_TILE(1); break;
#undef NNLIB_TILE
    }
  }
}

// C[rows, kPanel] = A[rows, K] @ Bp[K, kPanel], or C += it (accumulate): A
// row-major in place, Bp a packed panel, C with row stride kPanel.
inline void panel_product(const float* a, int64_t lda, int64_t rows, const float* bp,
                          int64_t k_size, float* c, bool accumulate = false) {
  if (accumulate)
    tiles_product<true, true, false>(a, lda, kRows * lda, bp, kPanel, k_size, rows, c, kPanel,
                                     kPanel);
  else
    tiles_product<false, true, false>(a, lda, kRows * lda, bp, kPanel, k_size, rows, c, kPanel,
                                      kPanel);
}

struct AlignedBuffer {
  float* data = nullptr;
  explicit AlignedBuffer(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    data = static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    std::memset(data, 0, bytes);
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

// ----------------------------------------------------------- the threads --
inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// The calling thread's place in the current job: rank 0 is the caller,
// helpers count up in the order they join; team is the most threads the job
// can have.
inline thread_local int64_t tl_rank = 0;
inline thread_local int64_t tl_team = 1;

// Runs job() on the calling thread and on helpers scheduled on XLA's own
// intra-op thread pool (the FFI's ThreadPool context), returning when every
// helper that started has left it. Helpers that start after the call is
// over return at once: they hold the call's small shared state, not the
// job. XLA's pool threads are the ones that just ran the operations before
// the call (and spin a while after them), so they join within microseconds,
// and the call adds no threads of its own to the two cores; a separate team
// competed with those spinning threads, and the benchmark GPT's attention
// calls took 2 to 10 ms where 1.5 was the call's time alone. Without a pool
// (num_threads 0) the caller runs the job alone; NNLIB_NATIVE_THREADS caps
// the threads.
inline void run_job(xla::ffi::ThreadPool& pool, const std::function<void()>& job) {
  int64_t threads = pool.num_threads();
  if (const char* env = std::getenv("NNLIB_NATIVE_THREADS")) {
    const int64_t n = std::atoi(env);
    if (n > 0) threads = std::min<int64_t>(threads, n);
  }
  threads = std::max<int64_t>(threads, 1);
  struct Shared {
    std::atomic<bool> open{true};
    std::atomic<int> active{0};
    std::atomic<int64_t> next_rank{1};
    const std::function<void()>* job = nullptr;
    int64_t team = 1;
  };
  auto shared = std::make_shared<Shared>();
  shared->job = &job;
  shared->team = threads;
  for (int64_t i = 1; i < threads; ++i)
    pool.Schedule([shared] {
      if (!shared->open.load()) return;
      shared->active.fetch_add(1);
      if (shared->open.load()) {
        tl_rank = shared->next_rank.fetch_add(1);
        tl_team = shared->team;
        (*shared->job)();
      }
      shared->active.fetch_sub(1);
    });
  tl_rank = 0;
  tl_team = threads;
  job();
  shared->open.store(false);
  while (shared->active.load() != 0) cpu_relax();
}

// Per-phase chunk claims of one call: every thread of the team runs the
// phases in order, claims chunks of each until none is left, then waits for
// the phase's last chunk to be done. A thread tries its own share of the
// chunks first (the same chunks at every phase, so the data a chunk keeps
// reusing, e.g. its slice of the weights, stays in that core's caches), then
// any chunk still unclaimed (so a late or descheduled thread delays nobody).
class Phases {
 public:
  explicit Phases(int64_t phases)
      : claimed_(new std::atomic<uint64_t>[phases]()),
        next_(new std::atomic<int64_t>[phases]()),
        done_(new std::atomic<int64_t>[phases]()) {}

  // team: how many threads share the phase (home chunks are split among
  // ranks below it); by default the job's.
  template <typename F>
  void run(int64_t phase, int64_t chunks, F&& chunk, int64_t team = tl_team) {
    auto run_chunk = [&](int64_t q) {
      chunk(q);
      done_[phase].fetch_add(1, std::memory_order_release);
    };
    if (chunks <= 64 && team > 1) {
      team = std::min<int64_t>(team, chunks);
      const int64_t home = (tl_rank % team) * chunks / team;
      for (int64_t i = 0; i < chunks; ++i) {
        const int64_t q = (home + i) % chunks;
        const uint64_t bit = uint64_t{1} << q;
        if (claimed_[phase].load(std::memory_order_relaxed) & bit) continue;
        if (claimed_[phase].fetch_or(bit, std::memory_order_relaxed) & bit) continue;
        run_chunk(q);
      }
    } else {
      for (int64_t q; (q = next_[phase].fetch_add(1, std::memory_order_relaxed)) < chunks;)
        run_chunk(q);
    }
    while (done_[phase].load(std::memory_order_acquire) < chunks) cpu_relax();
  }

 private:
  std::unique_ptr<std::atomic<uint64_t>[]> claimed_;
  std::unique_ptr<std::atomic<int64_t>[]> next_, done_;
};

}  // namespace nnlib_native

#endif  // NNLIB_NATIVE_COMMON_H_
