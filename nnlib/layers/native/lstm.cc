// The LSTM recurrence as one native call each way, for XLA:CPU through its FFI.
//
// nnlib.layers.RNN runs an LSTMCell's time loop here on the CPU when this
// file compiles on the machine (nnlib.layers._native builds it on first use
// with the system's C++ compiler and -march=native). It is what PyTorch's
// oneDNN LSTM and cuDNN do: the whole loop, its products and its gates, in one
// call, with the recurrent weights laid out once per call for the product,
// the gates computed while the product's output is still in cache, and the
// CPU's cores splitting every step by hidden unit. Narrow inputs are
// projected in the loop too (x_t W_in with the recurrent product, no
// [T, B, 4H] array of projections written and read back); wider ones come
// projected by XLA (p_t). The backward forms the weight gradients on the
// threads the loop does not need, while it runs.
//
// Math (gate order i, f, g, o, as nnlib.layers.LSTMCell and PyTorch):
//   z_t = p_t + x_t W_in + b + h_{t-1} W    W_in: [F, 4H], W: [H, 4H]
//   i, f, o = sigmoid(z_i, z_f, z_o);  g = tanh(z_g)
//   c_t = f c_{t-1} + i g;              h_t = o tanh(c_t)
// The bias b is added here, not to p beforehand: a whole pass less.
// The backward call returns dz_t (the gradient of z_t, which is also that of
// p_t; the inputs' gradient is dz W_in^T, left to XLA) for every step, the
// gradients of the initial state, and the weight and bias gradients
// dW_in = sum_t x_t^T dz_t, dW = sum_t h_{t-1}^T dz_t (in blocks of steps,
// formed as the loop finishes them) and db = sum_t,b dz_t (summed in the
// loop). Every sum is taken in an order that does not depend on the threads.
//
// Float32. x [B, T, F] batch first as RNN takes it; p, dz, gates [T, B, 4H]
// and h, c [T, B, H] time first.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nnlib_native;

// The state before step t of a loop over steps (run from the last step back
// when reverse): the initial state at the loop's first step, else the state
// written at the step before t.
inline const float* state_before(const float* init, const float* all, int64_t t,
                                 int64_t steps, bool reverse, int64_t stride) {
  const bool first = reverse ? t == steps - 1 : t == 0;
  return first ? init : all + (reverse ? t + 1 : t - 1) * stride;
}

// ------------------------------------------------------------- forward --
ffi::Error LstmForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> projected,
                       ffi::Buffer<ffi::F32> inputs, ffi::Buffer<ffi::F32> in_kernel,
                       ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                       ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> cs,
                       ffi::ResultBuffer<ffi::F32> gates, int64_t reverse) {
  auto xdims = inputs.dimensions();
  if (xdims.size() != 3) return ffi::Error::InvalidArgument("inputs must be [B, T, F]");
  const int64_t batch = xdims[0], steps = xdims[1], features = xdims[2];
  auto kdims = kernel.dimensions();
  if (kdims.size() != 2 || kdims[1] != 4 * kdims[0])
    return ffi::Error::InvalidArgument("kernel must be [H, 4H]");
  const int64_t hidden = kdims[0], gate_cols = kdims[1];
  if (in_kernel.dimensions().size() != 2 || in_kernel.dimensions()[0] != features ||
      in_kernel.dimensions()[1] != gate_cols)
    return ffi::Error::InvalidArgument("in_kernel must be [F, 4H]");
  if (bias.element_count() != static_cast<size_t>(gate_cols))
    return ffi::Error::InvalidArgument("bias must be [4H]");
  // projected is [T, B, 4H], or empty where the inputs' half is all x W_in.
  const bool has_projected = projected.element_count() != 0;
  if (has_projected &&
      (projected.dimensions().size() != 3 || projected.dimensions()[0] != steps ||
       projected.dimensions()[1] != batch || projected.dimensions()[2] != gate_cols))
    return ffi::Error::InvalidArgument("projected must be [T, B, 4H] or empty");
  const float* p = projected.typed_data();
  const float* x = inputs.typed_data();
  const float* bias_all = bias.typed_data();
  const float* w = kernel.typed_data();
  const float* w_in = in_kernel.typed_data();
  const float* c_init = c0.typed_data();
  const float* h_init = h0.typed_data();
  float* h_out = hs->typed_data();
  float* c_out = cs->typed_data();
  float* g_out = gates->typed_data();
  if (steps == 0 || batch == 0 || hidden == 0) return ffi::Error::Success();

  const int64_t chunks = (hidden + kPanel - 1) / kPanel;
  const int64_t depth = features + hidden;
  // Packed weights: for chunk q and gate g, a panel [F + H, kPanel] of
  // columns g H + q kPanel + u (zero past H): W_in's rows, then W's.
  AlignedBuffer packed(static_cast<size_t>(chunks) * 4 * depth * kPanel);
  for (int64_t q = 0; q < chunks; ++q)
    for (int g = 0; g < 4; ++g) {
      float* panel = packed.data + (q * 4 + g) * depth * kPanel;
      const int64_t width = std::min<int64_t>(kPanel, hidden - q * kPanel);
      for (int64_t k = 0; k < depth; ++k) {
        const float* row = k < features ? w_in + k * gate_cols : w + (k - features) * gate_cols;
        std::memcpy(panel + k * kPanel, row + g * hidden + q * kPanel, width * sizeof(float));
      }
    }

  Phases phases(steps);
  auto job = [&] {
    AlignedBuffer z(static_cast<size_t>(4) * batch * kPanel);
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      const float* h_prev = state_before(h_init, h_out, t, steps, reverse, batch * hidden);
      const float* c_prev = state_before(c_init, c_out, t, steps, reverse, batch * hidden);
      phases.run(s, chunks, [&](int64_t q) {
        const int64_t u0 = q * kPanel;
        const int64_t width = std::min<int64_t>(kPanel, hidden - u0);
        // z = x_t W_in + h_{t-1} W for this chunk's units of each gate (x
        // is batch major: row b of step t at x + (b T + t) F).
        for (int g = 0; g < 4; ++g) {
          const float* panel = packed.data + (q * 4 + g) * depth * kPanel;
          float* zg = z.data + g * batch * kPanel;
          if (features > 0)
            panel_product(x + t * features, steps * features, batch, panel, features, zg);
          panel_product(h_prev, hidden, batch, panel + features * kPanel, hidden, zg,
                        features > 0);
        }
        for (int64_t b = 0; b < batch; ++b) {
          const float* prow = has_projected ? p + (t * batch + b) * gate_cols + u0 : nullptr;
          float* grow = g_out + (t * batch + b) * gate_cols + u0;
          const float* cp = c_prev + b * hidden + u0;
          float* co = c_out + (t * batch + b) * hidden + u0;
          float* ho = h_out + (t * batch + b) * hidden + u0;
          const float* brow = bias_all + u0;
          for (int64_t u = 0; u < width; u += kVec) {
            const int64_t n = std::min<int64_t>(kVec, width - u);
            // Gate g's pre-activation: the product, the bias, p if given.
            auto pre = [&](int g) {
              vf v = load(z.data + (g * batch + b) * kPanel + u) + load_n(brow + g * hidden + u, n);
              return prow ? v + load_n(prow + g * hidden + u, n) : v;
            };
            const vf i = vsigmoid(pre(0));
            const vf f = vsigmoid(pre(1));
            const vf gg = vtanh(pre(2));
            const vf o = vsigmoid(pre(3));
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
  run_job(pool, job);
  return ffi::Error::Success();
}

// ------------------------------------------------------- weight gradient --
// dW[j0:j0+R, panel] += sum_k A[k, 0:R] Z[k, panel] over the K = steps x batch
// rows of a block of steps, both operands packed contiguously (tiles_product):
// A[k, r] = h_prev[k, j0 + r] (a tile of R hidden units), Z the block's dz
// rows, this panel's kPanel columns (zero past the last).

// Steps per block of the weight gradient: the block's packed dz panel (32 x
// 64 floats a step at the benchmark's sizes) stays in the core's L1 cache
// while every tile of the panel's column reads it. (A single-core
// microbenchmark at the benchmark's sizes: 136 GFLOP/s with both operands
// packed, 121 with the hidden states read in place.)
constexpr int64_t kStepsPerBlock = 4;

// Groups of blocks the weight gradient is split into (see LstmBackward).
constexpr int64_t kWeightGroups = 4;

// ------------------------------------------------------------ backward --
ffi::Error LstmBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> gates,
                        ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> h0,
                        ffi::Buffer<ffi::F32> inputs, ffi::Buffer<ffi::F32> ct_hs,
                        ffi::Buffer<ffi::F32> ct_c, ffi::Buffer<ffi::F32> ct_h,
                        ffi::ResultBuffer<ffi::F32> ct_z, ffi::ResultBuffer<ffi::F32> ct_c0,
                        ffi::ResultBuffer<ffi::F32> ct_h0, ffi::ResultBuffer<ffi::F32> ct_in_kernel,
                        ffi::ResultBuffer<ffi::F32> ct_kernel,
                        ffi::ResultBuffer<ffi::F32> ct_bias, int64_t reverse) {
  auto dims = gates.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("gates must be [T, B, 4H]");
  const int64_t steps = dims[0], batch = dims[1], gate_cols = dims[2];
  const int64_t hidden = gate_cols / 4;
  if (inputs.dimensions().size() != 3 || inputs.dimensions()[0] != batch ||
      inputs.dimensions()[1] != steps)
    return ffi::Error::InvalidArgument("inputs must be [B, T, F]");
  const int64_t features = inputs.dimensions()[2];
  const float* x = inputs.typed_data();
  float* dw_in = ct_in_kernel->typed_data();
  const float* w = kernel.typed_data();
  const float* gt = gates.typed_data();
  const float* c_all = cs.typed_data();
  const float* c_init = c0.typed_data();
  // ct_hs is [T, B, H], or empty where the outputs' cotangent is all zeros.
  const bool has_dh_out = ct_hs.element_count() != 0;
  if (has_dh_out && ct_hs.element_count() != static_cast<size_t>(steps * batch * hidden))
    return ffi::Error::InvalidArgument("ct_hs must be [T, B, H] or empty");
  const float* dh_out = ct_hs.typed_data();
  float* dz = ct_z->typed_data();
  float* dc_init = ct_c0->typed_data();
  float* dh_init = ct_h0->typed_data();
  float* dw = ct_kernel->typed_data();
  float* db = ct_bias->typed_data();
  const float* h_all = hs.typed_data();
  const float* h_init = h0.typed_data();
  std::memset(dw, 0, hidden * gate_cols * sizeof(float));
  std::memset(dw_in, 0, features * gate_cols * sizeof(float));
  std::memset(db, 0, gate_cols * sizeof(float));
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

  const int64_t panels = (gate_cols + kPanel - 1) / kPanel;
  // The weight gradients' rows in tiles of kRows: the input features' (of
  // dW_in, from x_t), then the hidden units' (of dW, from h_{t-1}).
  const int64_t x_tiles = (features + kRows - 1) / kRows;
  const int64_t tiles = x_tiles + (hidden + kRows - 1) / kRows;
  const int64_t blocks = (steps + kStepsPerBlock - 1) / kStepsPerBlock;
  Phases phases(1 + steps);
  // The weight gradients are formed while the loop runs: a block of steps is
  // ready once the loop has passed all its steps (blocks become ready from
  // the last one back, or from the first with reverse). The blocks, in that
  // order, make kWeightGroups groups; a thread outside the loop's team (and
  // each loop thread once the loop is done) takes the next group, sums its
  // blocks into its own accumulators as they become ready, and adds them to
  // dW_in and dW after the group before has been added: every element of
  // the gradients is summed in the same order whichever thread took which
  // group, so results repeat exactly. On two cores one thread runs the loop
  // and the other the weight gradient: the loop's per-step products are too
  // small to split without waiting at every step (two threads took 5.4 ms
  // where one took 7.4 at the benchmark's sizes, the weight gradient alone
  // 8.0), and the two threads then finish within ~1 ms of each other.
  const int64_t groups = std::min(kWeightGroups, blocks);
  std::atomic<int64_t> processed{0};  // steps whose dz is final
  std::atomic<int64_t> next_group{0};
  std::atomic<int64_t> merged{0};  // groups added to dW_in and dW
  auto block_at = [&](int64_t i) { return reverse ? i : blocks - 1 - i; };
  auto ready = [&](int64_t j) {
    const int64_t need = reverse ? std::min((j + 1) * kStepsPerBlock, steps)
                                 : steps - j * kStepsPerBlock;
    return processed.load(std::memory_order_acquire) >= need;
  };
  auto mark_processed = [&](int64_t n) {
    int64_t seen = processed.load(std::memory_order_relaxed);
    while (seen < n && !processed.compare_exchange_weak(seen, n, std::memory_order_release)) {
    }
  };
  auto job = [&] {
    const int64_t loop_team = std::max<int64_t>(1, tl_team / 2);
    const bool in_loop = tl_rank < loop_team;
    AlignedBuffer out(in_loop ? static_cast<size_t>(batch) * kPanel : 0);
    // The gates' backward at step t for the units of chunk q: dz_t from
    // dh (dh_out_t plus the recurrent part) and the carried dc.
    auto gates_backward = [&](int64_t t, int64_t q) {
      const float* c_prev = state_before(c_init, c_all, t, steps, reverse, batch * hidden);
      const int64_t u0 = q * kPanel;
      const int64_t width = std::min<int64_t>(kPanel, hidden - u0);
      for (int64_t b = 0; b < batch; ++b) {
        const float* grow = gt + (t * batch + b) * gate_cols + u0;
        float* zrow = dz + (t * batch + b) * gate_cols + u0;
        const float* crow = c_all + (t * batch + b) * hidden + u0;
        const float* cprow = c_prev + b * hidden + u0;
        const float* dhrow = has_dh_out ? dh_out + (t * batch + b) * hidden + u0 : nullptr;
        float* dhr = dh_rec.data + b * hidden + u0;
        float* dcr = dc_carry.data + b * hidden + u0;
        for (int64_t u = 0; u < width; u += kVec) {
          const int64_t n = std::min<int64_t>(kVec, width - u);
          const vf i = load_n(grow + u, n), f = load_n(grow + hidden + u, n);
          const vf gg = load_n(grow + 2 * hidden + u, n), o = load_n(grow + 3 * hidden + u, n);
          const vf c = load_n(crow + u, n), cp = load_n(cprow + u, n);
          const vf dh = dhrow ? load_n(dhrow + u, n) + load_n(dhr + u, n) : load_n(dhr + u, n);
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
      // db += sum_b dz_t (this step's chunk is this thread's alone).
      for (int g = 0; g < 4; ++g)
        for (int64_t u = 0; u < width; u += kVec) {
          const int64_t n = std::min<int64_t>(kVec, width - u);
          vf sum = load_n(db + g * hidden + u0 + u, n);
          for (int64_t b = 0; b < batch; ++b)
            sum += load_n(dz + (t * batch + b) * gate_cols + g * hidden + u0 + u, n);
          store_n(db + g * hidden + u0 + u, sum, n);
        }
    };
    auto time_of = [&](int64_t s) { return reverse ? s : steps - 1 - s; };  // backward through time
    auto loop = [&] {
      phases.run(0, chunks, [&](int64_t q) { gates_backward(time_of(0), q); }, loop_team);
      mark_processed(1);
      for (int64_t s = 0; s < steps; ++s) {
        // Every unit's dz_t is written: dh_{t-1} = dz_t W^T by units, then
        // (the same units' dh is all it needs) the gates' backward at t - 1.
        const float* zt = dz + time_of(s) * batch * gate_cols;
        phases.run(1 + s, chunks, [&](int64_t q) {
          const int64_t u0 = q * kPanel;
          const int64_t width = std::min<int64_t>(kPanel, hidden - u0);
          panel_product(zt, gate_cols, batch, packed.data + q * gate_cols * kPanel, gate_cols,
                        out.data);
          for (int64_t b = 0; b < batch; ++b)
            std::memcpy(dh_rec.data + b * hidden + u0, out.data + b * kPanel,
                        width * sizeof(float));
          if (s + 1 < steps) gates_backward(time_of(s + 1), q);
        }, loop_team);
        mark_processed(std::min(s + 2, steps));
      }
    };
    // dW = sum_t h_{t-1}^T dz_t (and dW_in = sum_t x_t^T dz_t), block j of
    // steps into acc: the block's inputs and hidden states packed into tiles
    // of rows, then each column panel of dz packed and multiplied.
    auto weight_block = [&](int64_t j, float* acc_in, float* acc, float* apack, float* zpack) {
      const int64_t s0 = j * kStepsPerBlock;
      const int64_t block = std::min(kStepsPerBlock, steps - s0);
      const int64_t k_size = block * batch;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const bool is_x = tile < x_tiles;
        const int64_t j0 = (is_x ? tile : tile - x_tiles) * kRows;
        const int64_t rows = std::min<int64_t>(kRows, (is_x ? features : hidden) - j0);
        float* dst = apack + tile * k_size * kRows;
        for (int64_t i = 0; i < block; ++i) {
          const int64_t t = s0 + i;
          for (int64_t b = 0; b < batch; ++b, dst += kRows) {
            const float* src =
                is_x ? x + (b * steps + t) * features + j0
                     : state_before(h_init, h_all, t, steps, reverse, batch * hidden) +
                           b * hidden + j0;
            for (int64_t r = 0; r < kRows; ++r) dst[r] = r < rows ? src[r] : 0.0f;
          }
        }
      }
      const float* h_tiles = apack + x_tiles * k_size * kRows;
      for (int64_t panel = 0; panel < panels; ++panel) {
        const int64_t n0 = panel * kPanel;
        const int64_t w = std::min<int64_t>(kPanel, gate_cols - n0);
        for (int64_t k = 0; k < k_size; ++k) {
          const float* src = dz + (s0 * batch + k) * gate_cols + n0;
          for (int64_t v = 0; v < kPanel; v += kVec)
            store(zpack + k * kPanel + v, load_n(src + v, std::clamp<int64_t>(w - v, 0, kVec)));
        }
        if (w == kPanel) {
          tiles_product<true, true, true>(apack, kRows, k_size * kRows, zpack, kPanel, k_size,
                                             features, acc_in + n0, gate_cols, w);
          tiles_product<true, true, true>(h_tiles, kRows, k_size * kRows, zpack, kPanel, k_size,
                                             hidden, acc + n0, gate_cols, w);
        } else {
          tiles_product<true, false, true>(apack, kRows, k_size * kRows, zpack, kPanel, k_size,
                                             features, acc_in + n0, gate_cols, w);
          tiles_product<true, false, true>(h_tiles, kRows, k_size * kRows, zpack, kPanel, k_size,
                                             hidden, acc + n0, gate_cols, w);
        }
      }
    };
    // Groups of ready blocks (see above), each summed into this thread's
    // accumulators and added in group order.
    auto weight_gradient = [&] {
      std::unique_ptr<AlignedBuffer> acc, apack, zpack;
      const int64_t n_in = features * gate_cols, n = hidden * gate_cols;
      for (;;) {
        const int64_t g = next_group.fetch_add(1);
        if (g >= groups) break;
        if (!acc) {
          acc = std::make_unique<AlignedBuffer>(static_cast<size_t>(n_in + n));
          apack = std::make_unique<AlignedBuffer>(static_cast<size_t>(tiles) * kStepsPerBlock *
                                                  batch * kRows);
          zpack = std::make_unique<AlignedBuffer>(static_cast<size_t>(kStepsPerBlock) * batch *
                                                  kPanel);
        } else {
          std::memset(acc->data, 0, (n_in + n) * sizeof(float));
        }
        for (int64_t i = g * blocks / groups; i < (g + 1) * blocks / groups; ++i) {
          const int64_t j = block_at(i);
          while (!ready(j)) cpu_relax();
          weight_block(j, acc->data, acc->data + n_in, apack->data, zpack->data);
        }
        while (merged.load(std::memory_order_acquire) != g) cpu_relax();
        add_into(dw_in, acc->data, n_in);
        add_into(dw, acc->data + n_in, n);
        merged.store(g + 1, std::memory_order_release);
      }
    };
    if (in_loop) loop();
    weight_gradient();
    if (tl_rank == 0)
      while (merged.load(std::memory_order_acquire) != groups) cpu_relax();
  };
  run_job(pool, job);
  std::memcpy(dc_init, dc_carry.data, batch * hidden * sizeof(float));
  std::memcpy(dh_init, dh_rec.data, batch * hidden * sizeof(float));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibLstmForward, LstmForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // projected [T, B, 4H] or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inputs [B, T, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_kernel [F, 4H]
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
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel [H, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gates [T, B, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cs [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0 [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hs [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inputs [B, T, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_hs [T, B, H] or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_c (final) [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_h (final) [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_z [T, B, 4H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_c0 [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_h0 [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_in_kernel [F, 4H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_kernel [H, 4H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_bias [4H]
                                  .Attr<int64_t>("reverse"));
