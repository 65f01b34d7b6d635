// The LSTM recurrence as one native call each way, for XLA:CPU through its FFI.
//
// nnlib.layers.RNN runs an LSTMCell's time loop here on the CPU when this
// file compiles on the machine (nnlib.layers._native builds it on first use
// with the system's C++ compiler and -march=native). It is what PyTorch's
// oneDNN LSTM and cuDNN do: the whole loop, its products and its gates, in one
// call, with the recurrent weights laid out once per call for the product,
// the gates computed while the product's output is still in cache, and the
// CPU's cores splitting every step by hidden unit.
// The inputs' projection and the weight gradient (one product over all steps)
// stay in XLA, which runs large products at its matmul speed.
//
// Math (gate order i, f, g, o, as nnlib.layers.LSTMCell and PyTorch):
//   z_t = p_t + b + h_{t-1} W           p_t: projected inputs, W: [H, 4H]
//   i, f, o = sigmoid(z_i, z_f, z_o);  g = tanh(z_g)
//   c_t = f c_{t-1} + i g;              h_t = o tanh(c_t)
// The bias b is added here, not to p beforehand: a whole pass over p less.
// The backward call returns dz_t (the gradient of z_t, which is also that of
// p_t) for every step and the gradients of the initial state; dW = sum_t
// h_{t-1}^T dz_t and db = sum_t,b dz_t are left to XLA.
//
// Everything is float32 and batch first: p, dz, gates [T, B, 4H]; h, c [T, B, H].

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <immintrin.h>
#include <sched.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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
inline vf splat(float x) { return vf{} + x; }
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
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x) for x in [-87.3, 88.7] (clamped), Cephes' expf: a degree-5
// polynomial after reducing by n ln 2; within 2 ulp of the exact value.
inline vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.7f));
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
// C[r, 0:kPanel] = sum_k A[r, k] Bp[k, 0:kPanel] for R rows; Bp is a packed,
// aligned panel [K, kPanel]; C has row stride kPanel.
template <int R>
inline void microkernel(const float* a, int64_t lda, const float* bp, int64_t k_size,
                        float* c) {
  vf acc[R][kPanelVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kPanelVecs; ++j) acc[r][j] = vf{};
  for (int64_t k = 0; k < k_size; ++k) {
    vf b[kPanelVecs];
    for (int j = 0; j < kPanelVecs; ++j)
      b[j] = *reinterpret_cast<const vf*>(bp + k * kPanel + j * kVec);
    for (int r = 0; r < R; ++r) {
      vf av = splat(a[r * lda + k]);
      for (int j = 0; j < kPanelVecs; ++j) acc[r][j] += av * b[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kPanelVecs; ++j) store(c + r * kPanel + j * kVec, acc[r][j]);
}

// C[rows, kPanel] = A[rows, K] @ Bp[K, kPanel].
inline void panel_product(const float* a, int64_t lda, int64_t rows, const float* bp,
                          int64_t k_size, float* c) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    microkernel<kRows>(a + r * lda, lda, bp, k_size, c + r * kPanel);
  switch (rows - r) {
    case 5: microkernel<5>(a + r * lda, lda, bp, k_size, c + r * kPanel); break;
    case 4: microkernel<4>(a + r * lda, lda, bp, k_size, c + r * kPanel); break;
    case 3: microkernel<3>(a + r * lda, lda, bp, k_size, c + r * kPanel); break;
    case 2: microkernel<2>(a + r * lda, lda, bp, k_size, c + r * kPanel); break;
    case 1: microkernel<1>(a + r * lda, lda, bp, k_size, c + r * kPanel); break;
    default: break;
  }
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

// A fixed team of threads that helps whichever call is running: the caller
// always works, and each other thread joins when it wakes (spinning briefly
// after a call, then asleep). Work is handed out in chunks per phase (a time
// step, or half of one), claimed from a counter, so a thread the OS has
// descheduled (XLA's and other libraries' threads share the cores) delays
// only the chunk it holds: the others take the rest. A static split with a
// barrier made every step wait for the slowest thread, and the train step of
// the benchmark's LSTM swung between 19 and 35 ms.
class Team {
 public:
  static Team& get() {
    static Team* team = new Team();  // never destroyed: workers outlive exit
    return *team;
  }

  int size() const { return size_; }

  // Runs job() on the calling thread and on every worker that wakes before
  // it ends; returns when all who joined have left it.
  void run(const std::function<void()>& job) {
    std::lock_guard<std::mutex> lock(call_mutex_);
    if (size_ <= 1) {
      job();
      return;
    }
    job_ = &job;
    open_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    job();
    open_.store(false);
    while (active_.load() != 0) cpu_relax();
  }

 private:
  Team() {
    cpu_set_t set;
    int cores = 1;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) cores = CPU_COUNT(&set);
    if (const char* env = std::getenv("NNLIB_NATIVE_THREADS")) {
      int n = std::atoi(env);
      if (n > 0) cores = n;
    }
    size_ = cores < 1 ? 1 : cores;
    for (int m = 1; m < size_; ++m) std::thread([this] { work(); }).detach();
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      // Spin ~20 us for a call that follows at once (the backward after the
      // forward), then sleep: a longer spin holds a core that XLA's own
      // threads need for the operations between the calls.
      uint64_t now = generation_.load(std::memory_order_acquire);
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
      for (int spin = 0; now == seen; ++spin) {
        cpu_relax();
        now = generation_.load(std::memory_order_acquire);
        if ((spin & 63) == 63 && std::chrono::steady_clock::now() > until) break;
      }
      if (now == seen) {
        generation_.wait(seen, std::memory_order_acquire);
        continue;
      }
      seen = now;
      // Join only a call still running; the caller waits for active_ to
      // drop to zero before it returns (and its job goes out of scope).
      if (!open_.load()) continue;
      active_.fetch_add(1);
      if (open_.load()) (*job_)();
      active_.fetch_sub(1);
    }
  }

  int size_ = 1;
  const std::function<void()>* job_ = nullptr;
  std::mutex call_mutex_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> open_{false};
  std::atomic<int> active_{0};
};

// Per-phase chunk counters of one call: every thread of the team runs the
// phases in order, claims chunks of each until none is left, then waits for
// the phase's last chunk to be done.
class Phases {
 public:
  Phases(int64_t phases, int64_t chunks)
      : claimed_(new std::atomic<int64_t>[phases]()),
        done_(new std::atomic<int64_t>[phases]()),
        chunks_(chunks) {}

  template <typename F>
  void run(int64_t phase, F&& chunk) {
    for (;;) {
      const int64_t q = claimed_[phase].fetch_add(1, std::memory_order_relaxed);
      if (q >= chunks_) break;
      chunk(q);
      done_[phase].fetch_add(1, std::memory_order_release);
    }
    while (done_[phase].load(std::memory_order_acquire) < chunks_) cpu_relax();
  }

 private:
  std::unique_ptr<std::atomic<int64_t>[]> claimed_, done_;
  int64_t chunks_;
};

// ------------------------------------------------------------- forward --
ffi::Error LstmForward(ffi::Buffer<ffi::F32> projected, ffi::Buffer<ffi::F32> kernel,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                       ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> cs,
                       ffi::ResultBuffer<ffi::F32> gates, int64_t reverse) {
  auto dims = projected.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("projected must be [T, B, 4H]");
  const int64_t steps = dims[0], batch = dims[1], gate_cols = dims[2];
  const int64_t hidden = gate_cols / 4;
  if (kernel.dimensions().size() != 2 || kernel.dimensions()[0] != hidden ||
      kernel.dimensions()[1] != gate_cols)
    return ffi::Error::InvalidArgument("kernel must be [H, 4H]");
  if (bias.element_count() != static_cast<size_t>(gate_cols))
    return ffi::Error::InvalidArgument("bias must be [4H]");
  const float* p = projected.typed_data();
  const float* bias_all = bias.typed_data();
  const float* w = kernel.typed_data();
  const float* c_init = c0.typed_data();
  const float* h_init = h0.typed_data();
  float* h_out = hs->typed_data();
  float* c_out = cs->typed_data();
  float* g_out = gates->typed_data();
  if (steps == 0 || batch == 0 || hidden == 0) return ffi::Error::Success();

  const int64_t chunks = (hidden + kPanel - 1) / kPanel;
  // Packed kernel: for chunk q and gate g, a panel [H, kPanel] of columns
  // g H + q kPanel + u (zero past H).
  AlignedBuffer packed(static_cast<size_t>(chunks) * 4 * hidden * kPanel);
  for (int64_t q = 0; q < chunks; ++q)
    for (int g = 0; g < 4; ++g) {
      float* panel = packed.data + (q * 4 + g) * hidden * kPanel;
      const int64_t width = std::min<int64_t>(kPanel, hidden - q * kPanel);
      for (int64_t k = 0; k < hidden; ++k)
        std::memcpy(panel + k * kPanel, w + k * gate_cols + g * hidden + q * kPanel,
                    width * sizeof(float));
    }

  Phases phases(steps, chunks);
  auto job = [&] {
    AlignedBuffer z(static_cast<size_t>(4) * batch * kPanel);
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      const int64_t t_prev = reverse ? t + 1 : t - 1;
      const float* h_prev = s == 0 ? h_init : h_out + t_prev * batch * hidden;
      const float* c_prev = s == 0 ? c_init : c_out + t_prev * batch * hidden;
      phases.run(s, [&](int64_t q) {
        const int64_t u0 = q * kPanel;
        const int64_t width = std::min<int64_t>(kPanel, hidden - u0);
        for (int g = 0; g < 4; ++g)
          panel_product(h_prev, hidden, batch, packed.data + (q * 4 + g) * hidden * kPanel,
                        hidden, z.data + g * batch * kPanel);
        for (int64_t b = 0; b < batch; ++b) {
          const float* prow = p + (t * batch + b) * gate_cols + u0;
          float* grow = g_out + (t * batch + b) * gate_cols + u0;
          const float* cp = c_prev + b * hidden + u0;
          float* co = c_out + (t * batch + b) * hidden + u0;
          float* ho = h_out + (t * batch + b) * hidden + u0;
          const float* brow = bias_all + u0;
          for (int64_t u = 0; u < width; u += kVec) {
            const int64_t n = std::min<int64_t>(kVec, width - u);
            const vf i = vsigmoid(load(z.data + (0 * batch + b) * kPanel + u) +
                                  load_n(prow + u, n) + load_n(brow + u, n));
            const vf f = vsigmoid(load(z.data + (1 * batch + b) * kPanel + u) +
                                  load_n(prow + hidden + u, n) +
                                  load_n(brow + hidden + u, n));
            const vf gg = vtanh(load(z.data + (2 * batch + b) * kPanel + u) +
                                load_n(prow + 2 * hidden + u, n) +
                                load_n(brow + 2 * hidden + u, n));
            const vf o = vsigmoid(load(z.data + (3 * batch + b) * kPanel + u) +
                                  load_n(prow + 3 * hidden + u, n) +
                                  load_n(brow + 3 * hidden + u, n));
            const vf c = f * load_n(cp + u, n) + i * gg;
            store_n(grow + u, i, n);
            store_n(grow + hidden + u, f, n);
            store_n(grow + 2 * hidden + u, gg, n);
            store_n(grow + 3 * hidden + u, o, n);
            store_n(co + u, c, n);
            store_n(ho + u, o * vtanh(c), n);
          }
        }
      });
    }
  };
  Team::get().run(job);
  return ffi::Error::Success();
}

// ------------------------------------------------------------ backward --
ffi::Error LstmBackward(ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> gates,
                        ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::F32> ct_hs, ffi::Buffer<ffi::F32> ct_c,
                        ffi::Buffer<ffi::F32> ct_h, ffi::ResultBuffer<ffi::F32> ct_z,
                        ffi::ResultBuffer<ffi::F32> ct_c0, ffi::ResultBuffer<ffi::F32> ct_h0,
                        int64_t reverse) {
  auto dims = gates.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("gates must be [T, B, 4H]");
  const int64_t steps = dims[0], batch = dims[1], gate_cols = dims[2];
  const int64_t hidden = gate_cols / 4;
  const float* w = kernel.typed_data();
  const float* gt = gates.typed_data();
  const float* c_all = cs.typed_data();
  const float* c_init = c0.typed_data();
  const float* dh_out = ct_hs.typed_data();
  float* dz = ct_z->typed_data();
  float* dc_init = ct_c0->typed_data();
  float* dh_init = ct_h0->typed_data();
  if (batch == 0 || hidden == 0) return ffi::Error::Success();
  if (steps == 0) {
    std::memcpy(dc_init, ct_c.typed_data(), batch * hidden * sizeof(float));
    std::memcpy(dh_init, ct_h.typed_data(), batch * hidden * sizeof(float));
    return ffi::Error::Success();
  }

  const int64_t chunks = (hidden + kPanel - 1) / kPanel;
  // Packed kernel transposed: for chunk q, a panel [4H, kPanel] with
  // panel[k, u] = W[q kPanel + u, k] (zero past H).
  AlignedBuffer packed(static_cast<size_t>(chunks) * gate_cols * kPanel);
  for (int64_t q = 0; q < chunks; ++q) {
    float* panel = packed.data + q * gate_cols * kPanel;
    const int64_t width = std::min<int64_t>(kPanel, hidden - q * kPanel);
    for (int64_t u = 0; u < width; ++u) {
      const float* row = w + (q * kPanel + u) * gate_cols;
      for (int64_t k = 0; k < gate_cols; ++k) panel[k * kPanel + u] = row[k];
    }
  }
  // The recurrent part of dh (dz_t W^T) and the carried dc: [B, H].
  AlignedBuffer dh_rec(static_cast<size_t>(batch) * hidden);
  AlignedBuffer dc_carry(static_cast<size_t>(batch) * hidden);
  std::memcpy(dh_rec.data, ct_h.typed_data(), batch * hidden * sizeof(float));
  std::memcpy(dc_carry.data, ct_c.typed_data(), batch * hidden * sizeof(float));

  Phases phases(2 * steps, chunks);
  auto job = [&] {
    AlignedBuffer out(static_cast<size_t>(batch) * kPanel);
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? s : steps - 1 - s;  // backward through time
      const bool first = reverse ? t == steps - 1 : t == 0;
      const int64_t t_prev = reverse ? t + 1 : t - 1;
      const float* c_prev = first ? c_init : c_all + t_prev * batch * hidden;
      phases.run(2 * s, [&](int64_t q) {  // the gates' backward, unit by unit
        const int64_t u0 = q * kPanel;
        const int64_t width = std::min<int64_t>(kPanel, hidden - u0);
        for (int64_t b = 0; b < batch; ++b) {
          const float* grow = gt + (t * batch + b) * gate_cols + u0;
          float* zrow = dz + (t * batch + b) * gate_cols + u0;
          const float* crow = c_all + (t * batch + b) * hidden + u0;
          const float* cprow = c_prev + b * hidden + u0;
          const float* dhrow = dh_out + (t * batch + b) * hidden + u0;
          float* dhr = dh_rec.data + b * hidden + u0;
          float* dcr = dc_carry.data + b * hidden + u0;
          for (int64_t u = 0; u < width; u += kVec) {
            const int64_t n = std::min<int64_t>(kVec, width - u);
            const vf i = load_n(grow + u, n), f = load_n(grow + hidden + u, n);
            const vf gg = load_n(grow + 2 * hidden + u, n), o = load_n(grow + 3 * hidden + u, n);
            const vf c = load_n(crow + u, n), cp = load_n(cprow + u, n);
            const vf dh = load_n(dhrow + u, n) + load_n(dhr + u, n);
            vf dc = load_n(dcr + u, n);
            const vf one = splat(1.0f);
            vf tc = vtanh(c);
            vf d_o = dh * tc;
            dc = dc + dh * o * (one - tc * tc);
            vf zi = dc * gg * i * (one - i);
            vf zf = dc * cp * f * (one - f);
            vf zg = dc * i * (one - gg * gg);
            vf zo = d_o * o * (one - o);
            vf dc_next = dc * f;
            store_n(zrow + u, zi, n);
            store_n(zrow + hidden + u, zf, n);
            store_n(zrow + 2 * hidden + u, zg, n);
            store_n(zrow + 3 * hidden + u, zo, n);
            store_n(dcr + u, dc_next, n);
          }
        }
      });
      // Every unit's dz_t is written: dh_{t-1} = dz_t W^T, by units.
      const float* zt = dz + t * batch * gate_cols;
      phases.run(2 * s + 1, [&](int64_t q) {
        const int64_t u0 = q * kPanel;
        const int64_t width = std::min<int64_t>(kPanel, hidden - u0);
        panel_product(zt, gate_cols, batch, packed.data + q * gate_cols * kPanel, gate_cols,
                      out.data);
        for (int64_t b = 0; b < batch; ++b)
          std::memcpy(dh_rec.data + b * hidden + u0, out.data + b * kPanel,
                      width * sizeof(float));
      });
    }
  };
  Team::get().run(job);
  std::memcpy(dc_init, dc_carry.data, batch * hidden * sizeof(float));
  std::memcpy(dh_init, dh_rec.data, batch * hidden * sizeof(float));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibLstmForward, LstmForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // projected [T, B, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [H, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0 [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs [T, B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cs [T, B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gates [T, B, 4H]
                                  .Attr<int64_t>("reverse"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibLstmBackward, LstmBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [H, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gates [T, B, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cs [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0 [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_hs [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_c (final) [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_h (final) [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_z [T, B, 4H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_c0 [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_h0 [B, H]
                                  .Attr<int64_t>("reverse"));
