// Scaled dot-product attention, forward and backward, as one native call each
// for XLA:CPU through its FFI (nnlib.layers._native builds it on first use).
//
// XLA runs attention as separate batched operations, each over every (batch,
// head) pair: the logits' product, the softmax, the values' product, and in
// the backward pass five more products and the softmax's backward. At the
// sizes of a small transformer every one of them is a batch of tiny matrix
// products (64 x 32 by 32 x 64 at the benchmark GPT's), run far below the
// CPU's matmul speed, with the [B, H, q, kv] arrays written to memory and read
// back between them. Here one (batch, head) pair is one task, done start to
// finish while its q, k, v and logits stay in cache, as PyTorch's CPU flash
// attention does; the cores claim tasks from a counter. Rows and columns that
// the mask removes entirely (a causal mask's upper triangle) are skipped.
//
// Math, per (batch b, head h), s = 1 / sqrt(head_dim) (the caller's):
//   S = s Q K^T, P = softmax over the keys where mask, 0 elsewhere
//   (a query with no key allowed gets P = 0 and an output of 0), O = P V.
//   lse_i = max_j S_ij + log sum_j exp(S_ij - max) is kept for the backward:
//   P_ij = exp(S_ij - lse_i), dV = P^T dO, dP = dO V^T,
//   dS = P * (dP - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q.
//
// Layouts (float32): q [B, Tq, H, D], k [B, Tk, H, D], v [B, Tk, H, Dv],
// mask uint8 [Bm, Hm, Tq, Tk] with Bm in {1, B} and Hm in {1, H}, outputs
// o [B, Tq, H, Dv] and lse [B, H, Tq].

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nnlib_native;

constexpr int kCols = 2 * kVec;  // columns of one microkernel call
constexpr int kBlockRows = 6;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[r, 0:w] = sum_{k0 <= k < k1} A[r ars + k aks] B[k ldb + 0:w] for r < R,
// w <= kCols; B rows may be unaligned, columns past w are neither read nor
// written.
template <int R, int V>
inline void whole_vectors_kernel(const float* a, int64_t ars, int64_t aks, const float* b,
                                 int64_t ldb, int64_t k0, int64_t k1, float* c, int64_t ldc) {
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = vf{};
  for (int64_t k = k0; k < k1; ++k) {
    vf bv[V];
    for (int j = 0; j < V; ++j) bv[j] = load(b + k * ldb + j * kVec);
    for (int r = 0; r < R; ++r) {
      const vf av = splat(a[r * ars + k * aks]);
      for (int j = 0; j < V; ++j) acc[r][j] += av * bv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) store(c + r * ldc + j * kVec, acc[r][j]);
}

template <int R>
inline void small_kernel(const float* a, int64_t ars, int64_t aks, const float* b,
                         int64_t ldb, int64_t k0, int64_t k1, float* c, int64_t ldc, int64_t w) {
  // Whole vectors (every block but a ragged last one) take a loop with
  // plain loads, its accumulators in registers: with the partial loads'
  // branch inside the loop the compiler kept them on the stack.
  if (w == 2 * kVec) return whole_vectors_kernel<R, 2>(a, ars, aks, b, ldb, k0, k1, c, ldc);
  if (w == kVec) return whole_vectors_kernel<R, 1>(a, ars, aks, b, ldb, k0, k1, c, ldc);
  vf acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vf{};
  const int64_t w0 = std::min<int64_t>(w, kVec), w1 = w - w0;
  if (w1 > 0) {
    for (int64_t k = k0; k < k1; ++k) {
      const vf b0 = load_n(b + k * ldb, w0), b1 = load_n(b + k * ldb + kVec, w1);
      for (int r = 0; r < R; ++r) {
        const vf av = splat(a[r * ars + k * aks]);
        acc[r][0] += av * b0;
        acc[r][1] += av * b1;
      }
    }
  } else {
    for (int64_t k = k0; k < k1; ++k) {
      const vf b0 = load_n(b + k * ldb, w0);
      for (int r = 0; r < R; ++r) acc[r][0] += splat(a[r * ars + k * aks]) * b0;
    }
  }
  for (int r = 0; r < R; ++r) {
    store_n(c + r * ldc, acc[r][0], w0);
    if (w1 > 0) store_n(c + r * ldc + kVec, acc[r][1], w1);
  }
}

// C[r, n0:n1] = sum_{k0 <= k < k1} A[r, k] B[k, n0:n1] for each block of rows
// [r0, r1), with krange(r0, r1) = [k0, k1) and nrange(r0, r1) = [n0, n1):
// products outside a row's own k range must be zero in A, and columns
// outside [n0, n1) are left as they were.
template <typename KRange, typename NRange>
void small_product(int64_t m, const float* a, int64_t ars, int64_t aks, const float* b,
                   int64_t ldb, float* c, int64_t ldc, KRange&& krange, NRange&& nrange) {
  for (int64_t r0 = 0; r0 < m; r0 += kBlockRows) {
    const int64_t rows = std::min<int64_t>(kBlockRows, m - r0);
    int64_t k0, k1, n0, n1;
    krange(r0, r0 + rows, &k0, &k1);
    nrange(r0, r0 + rows, &n0, &n1);
    const float* ar = a + r0 * ars;
    float* cr = c + r0 * ldc;
    for (int64_t j = n0; j < n1; j += kCols) {
      const int64_t w = std::min<int64_t>(kCols, n1 - j);
      switch (rows) {
        case 6: small_kernel<6>(ar, ars, aks, b + j, ldb, k0, k1, cr + j, ldc, w); break;
        case 5: small_kernel<5>(ar, ars, aks, b + j, ldb, k0, k1, cr + j, ldc, w); break;
        case 4: small_kernel<4>(ar, ars, aks, b + j, ldb, k0, k1, cr + j, ldc, w); break;
        case 3: small_kernel<3>(ar, ars, aks, b + j, ldb, k0, k1, cr + j, ldc, w); break;
        case 2: small_kernel<2>(ar, ars, aks, b + j, ldb, k0, k1, cr + j, ldc, w); break;
        default: small_kernel<1>(ar, ars, aks, b + j, ldb, k0, k1, cr + j, ldc, w); break;
      }
    }
  }
}

struct Shapes {
  int64_t batch, tq, tk, heads, d, dv, mask_batch, mask_heads;
};

// Where the mask lets each query row attend: keys [lo, hi) contain every
// allowed key of row i (hi = lo = 0 for none); and for each key column j the
// rows [clo, chi) that may attend to it.
struct Ranges {
  std::vector<int64_t> lo, hi, clo, chi;
  AlignedBuffer keep;  // [tq, ld]: 1 where the mask allows, else 0 (padding too)
  Ranges(const uint8_t* mask, int64_t tq, int64_t tk, int64_t ld)
      : lo(tq, 0), hi(tq, 0), clo(tk, 0), chi(tk, 0), keep(tq * ld) {
    for (int64_t i = 0; i < tq; ++i)
      for (int64_t j = 0; j < tk; ++j) keep.data[i * ld + j] = mask[i * tk + j] ? 1.0f : 0.0f;
    std::vector<int64_t> first_row(tk, tq), last_row(tk, -1);
    for (int64_t i = 0; i < tq; ++i) {
      const uint8_t* row = mask + i * tk;
      int64_t first = tk, last = -1;
      for (int64_t j = 0; j < tk; ++j)
        if (row[j]) {
          first = std::min(first, j);
          last = j;
          first_row[j] = std::min(first_row[j], i);
          last_row[j] = i;
        }
      if (last >= 0) {
        lo[i] = first;
        hi[i] = last + 1;
      }
    }
    for (int64_t j = 0; j < tk; ++j)
      if (last_row[j] >= 0) {
        clo[j] = first_row[j];
        chi[j] = last_row[j] + 1;
      }
  }
  // The union of [lo, hi) over rows [r0, r1) (or columns, for clo/chi).
  static void span(const std::vector<int64_t>& lo, const std::vector<int64_t>& hi, int64_t r0,
                   int64_t r1, int64_t* k0, int64_t* k1) {
    int64_t a = std::numeric_limits<int64_t>::max(), b = 0;
    for (int64_t r = r0; r < r1; ++r)
      if (hi[r] > lo[r]) {
        a = std::min(a, lo[r]);
        b = std::max(b, hi[r]);
      }
    if (b == 0) a = 0;
    *k0 = a;
    *k1 = b;
  }
};

// Every column block a row block's allowed keys touch: [n0, n1), whole
// vectors (the rows' [lo, hi) padded out to kVec, within ld).
inline void key_blocks(const Ranges& rg, int64_t r0, int64_t r1, int64_t ld, int64_t* n0,
                       int64_t* n1) {
  int64_t k0, k1;
  Ranges::span(rg.lo, rg.hi, r0, r1, &k0, &k1);
  *n0 = k0 / kVec * kVec;
  *n1 = std::min(ld, round_up(k1, kVec));
}

// The task's logits, masked and exponentiated: p[i, j] = exp(s S_ij - base_i)
// where the mask allows (keep = 1), 0 elsewhere in the row. With lse given
// (backward), base = lse and p is the softmax; without it (forward), base is
// the row maximum and lse_out / inv_sum receive the lse and 1 / the row sum.
void probabilities(const Shapes& sh, const float* q, int64_t q_row, const float* kt,
                   int64_t ld, const float* keep, const Ranges& rg, float scale,
                   const float* lse_in, float* p, float* lse_out, float* inv_sum) {
  small_product(
      sh.tq, q, q_row, 1, kt, ld, p, ld,
      [&](int64_t, int64_t, int64_t* k0, int64_t* k1) {
        *k0 = 0;
        *k1 = sh.d;
      },
      [&](int64_t r0, int64_t r1, int64_t* n0, int64_t* n1) {
        key_blocks(rg, r0, r1, ld, n0, n1);
      });
  const vf minus_inf = splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < sh.tq; ++i) {
    float* row = p + i * ld;
    const float* krow = keep + i * ld;
    const int64_t lo = rg.lo[i] / kVec * kVec, hi = std::min(ld, round_up(rg.hi[i], kVec));
    if (rg.hi[i] <= rg.lo[i]) {
      std::memset(row, 0, ld * sizeof(float));
      if (lse_out) lse_out[i] = 0.0f;
      if (inv_sum) inv_sum[i] = 0.0f;
      continue;
    }
    float base;
    if (lse_in) {
      base = lse_in[i];
    } else {
      vf top = minus_inf;
      for (int64_t j = lo; j < hi; j += kVec) {
        const vf x = load(row + j) * splat(scale);
        top = vmax(top, load(krow + j) > splat(0.0f) ? x : minus_inf);
      }
      base = top[0];
      for (int u = 1; u < kVec; ++u) base = std::max(base, top[u]);
    }
    vf sum = vf{};
    std::memset(row, 0, lo * sizeof(float));
    for (int64_t j = lo; j < hi; j += kVec) {
      const vf e = vexp(load(row + j) * splat(scale) - splat(base)) * load(krow + j);
      sum += e;
      store(row + j, e);
    }
    std::memset(row + hi, 0, (ld - hi) * sizeof(float));
    if (!lse_in) {
      float total = 0.0f;
      for (int u = 0; u < kVec; ++u) total += sum[u];
      lse_out[i] = base + std::log(total);
      inv_sum[i] = 1.0f / total;
    }
  }
}

// kt[d, j] = k[j, d] for the task (ld columns, zero padded).
void transpose_rows(const float* x, int64_t rows, int64_t cols, int64_t stride, float* xt,
                    int64_t ld) {
  for (int64_t d = 0; d < cols; ++d) {
    float* out = xt + d * ld;
    for (int64_t j = 0; j < rows; ++j) out[j] = x[j * stride + d];
    for (int64_t j = rows; j < ld; ++j) out[j] = 0.0f;
  }
}

// One Ranges per distinct (batch, head) slice of the mask, built by the
// team in a call's first phase (the tasks follow in the second).
class SliceRanges {
 public:
  SliceRanges(const Shapes& sh, const uint8_t* mask, int64_t ld)
      : sh_(sh), mask_(mask), ld_(ld), slices_(sh.mask_batch * sh.mask_heads) {}
  void build(Phases& phases, int64_t phase) {
    phases.run(phase, static_cast<int64_t>(slices_.size()), [&](int64_t s) {
      slices_[s] = std::make_unique<Ranges>(mask_ + s * sh_.tq * sh_.tk, sh_.tq, sh_.tk, ld_);
    });
  }
  const Ranges& operator[](int64_t s) const { return *slices_[s]; }

 private:
  const Shapes& sh_;
  const uint8_t* mask_;
  int64_t ld_;
  std::vector<std::unique_ptr<Ranges>> slices_;
};

// Where a [B, T, H, D] operand's element (b, t, h, d) lives: base + (b T + t)
// row + h D + d. A separate array has row = H D; q, k and v inside one fused
// [B, T, 3, H, D] array (a transformer's qkv projection, passed as is, with
// no copies) have row = 3 H D and bases H D apart.
template <typename T>
struct View {
  T* base;
  int64_t row;
  T* at(int64_t b, int64_t steps, int64_t h, int64_t d) const {
    return base + b * steps * row + h * d;
  }
};

struct Task {
  int64_t b, h, slice;
};

inline Task task_of(const Shapes& sh, int64_t task) {
  const int64_t b = task / sh.heads, h = task % sh.heads;
  return Task{b, h, (sh.mask_batch == 1 ? 0 : b) * sh.mask_heads + (sh.mask_heads == 1 ? 0 : h)};
}

void forward(ffi::ThreadPool& pool, const Shapes& sh, View<const float> q, View<const float> k, View<const float> v,
             const uint8_t* mask, float* op, float* lp, float scale) {
  if (sh.batch * sh.heads * sh.tq == 0) return;
  const int64_t ld = round_up(std::max<int64_t>(sh.tk, 1), kVec);
  const int64_t ldo = round_up(sh.dv, kVec);
  SliceRanges ranges(sh, mask, ld);
  Phases phases(2);
  auto job = [&] {
    AlignedBuffer kt(sh.d * ld), p(sh.tq * ld), o(sh.tq * ldo), inv(sh.tq);
    ranges.build(phases, 0);
    phases.run(1, sh.batch * sh.heads, [&](int64_t index) {
      const Task t = task_of(sh, index);
      const Ranges& rg = ranges[t.slice];
      const float* qt = q.at(t.b, sh.tq, t.h, sh.d);
      const float* vt = v.at(t.b, sh.tk, t.h, sh.dv);
      transpose_rows(k.at(t.b, sh.tk, t.h, sh.d), sh.tk, sh.d, k.row, kt.data, ld);
      probabilities(sh, qt, q.row, kt.data, ld, rg.keep.data, rg, scale, nullptr, p.data,
                    lp + (t.b * sh.heads + t.h) * sh.tq, inv.data);
      small_product(
          sh.tq, p.data, ld, 1, vt, v.row, o.data, ldo,
          [&](int64_t r0, int64_t r1, int64_t* k0, int64_t* k1) {
            Ranges::span(rg.lo, rg.hi, r0, r1, k0, k1);
          },
          [&](int64_t, int64_t, int64_t* n0, int64_t* n1) {
            *n0 = 0;
            *n1 = sh.dv;
          });
      for (int64_t i = 0; i < sh.tq; ++i) {
        float* dst = op + ((t.b * sh.tq + i) * sh.heads + t.h) * sh.dv;
        const float* src = o.data + i * ldo;
        const vf s = splat(inv.data[i]);
        for (int64_t d = 0; d < sh.dv; d += kVec) {
          const int64_t n = std::min<int64_t>(kVec, sh.dv - d);
          store_n(dst + d, load(src + d) * s, n);
        }
      }
    });
  };
  run_job(pool, job);
}

void backward(ffi::ThreadPool& pool, const Shapes& sh, View<const float> q, View<const float> k, View<const float> v,
              const uint8_t* mask, const float* op, const float* lp, const float* gp,
              View<float> dq, View<float> dk, View<float> dv, float scale) {
  if (sh.batch * sh.heads == 0) return;
  const int64_t ld = round_up(std::max<int64_t>(sh.tk, 1), kVec);
  const int64_t os = sh.heads * sh.dv;  // row stride of out and its cotangent
  SliceRanges ranges(sh, mask, ld);
  Phases phases(2);
  auto job = [&] {
    AlignedBuffer kt(sh.d * ld), vt(sh.dv * ld), p(sh.tq * ld), dp(sh.tq * ld);
    ranges.build(phases, 0);
    phases.run(1, sh.batch * sh.heads, [&](int64_t index) {
      const Task t = task_of(sh, index);
      const Ranges& rg = ranges[t.slice];
      const float* qt = q.at(t.b, sh.tq, t.h, sh.d);
      const float* ktask = k.at(t.b, sh.tk, t.h, sh.d);
      const float* vtask = v.at(t.b, sh.tk, t.h, sh.dv);
      const float* ot = op + (t.b * sh.tq * sh.heads + t.h) * sh.dv;
      const float* gt = gp + (t.b * sh.tq * sh.heads + t.h) * sh.dv;
      transpose_rows(ktask, sh.tk, sh.d, k.row, kt.data, ld);
      transpose_rows(vtask, sh.tk, sh.dv, v.row, vt.data, ld);
      probabilities(sh, qt, q.row, kt.data, ld, rg.keep.data, rg, scale,
                    lp + (t.b * sh.heads + t.h) * sh.tq, p.data, nullptr, nullptr);
      auto rows_span = [&](int64_t r0, int64_t r1, int64_t* k0, int64_t* k1) {
        Ranges::span(rg.lo, rg.hi, r0, r1, k0, k1);
      };
      auto cols_span = [&](int64_t r0, int64_t r1, int64_t* k0, int64_t* k1) {
        Ranges::span(rg.clo, rg.chi, r0, r1, k0, k1);
      };
      auto all = [](int64_t n) {
        return [n](int64_t, int64_t, int64_t* n0, int64_t* n1) {
          *n0 = 0;
          *n1 = n;
        };
      };
      // dP = dO V^T on the keys each row block may see.
      small_product(sh.tq, gt, os, 1, vt.data, ld, dp.data, ld, all(sh.dv),
                    [&](int64_t r0, int64_t r1, int64_t* n0, int64_t* n1) {
                      key_blocks(rg, r0, r1, ld, n0, n1);
                    });
      // dS = s P (dP - rowsum(dO * O)), zero wherever P is.
      for (int64_t i = 0; i < sh.tq; ++i) {
        float* row = dp.data + i * ld;
        const float* prow = p.data + i * ld;
        if (rg.hi[i] <= rg.lo[i]) {
          std::memset(row, 0, ld * sizeof(float));
          continue;
        }
        vf acc = vf{};
        for (int64_t d = 0; d < sh.dv; d += kVec) {
          const int64_t n = std::min<int64_t>(kVec, sh.dv - d);
          acc += load_n(gt + i * os + d, n) * load_n(ot + i * os + d, n);
        }
        float dot = 0.0f;
        for (int u = 0; u < kVec; ++u) dot += acc[u];
        const int64_t lo = rg.lo[i] / kVec * kVec, hi = std::min(ld, round_up(rg.hi[i], kVec));
        std::memset(row, 0, lo * sizeof(float));
        for (int64_t j = lo; j < hi; j += kVec)
          store(row + j, load(prow + j) * (load(row + j) - splat(dot)) * splat(scale));
        std::memset(row + hi, 0, (ld - hi) * sizeof(float));
      }
      // dQ = dS K over each row block's keys; dK = dS^T Q and dV = P^T dO
      // over each key block's queries; written in place (every row, whole:
      // a row with no key or query allowed gets zeros).
      small_product(sh.tq, dp.data, ld, 1, ktask, k.row, dq.at(t.b, sh.tq, t.h, sh.d), dq.row,
                    rows_span, all(sh.d));
      small_product(sh.tk, dp.data, 1, ld, qt, q.row, dk.at(t.b, sh.tk, t.h, sh.d), dk.row,
                    cols_span, all(sh.d));
      small_product(sh.tk, p.data, 1, ld, gt, os, dv.at(t.b, sh.tk, t.h, sh.dv), dv.row,
                    cols_span, all(sh.dv));
    });
  };
  run_job(pool, job);
}

ffi::Error check_mask(const Shapes& sh, const ffi::Buffer<ffi::U8>& mask) {
  auto md = mask.dimensions();
  if (md.size() != 4 || md[2] != sh.tq || md[3] != sh.tk ||
      (md[0] != 1 && md[0] != sh.batch) || (md[1] != 1 && md[1] != sh.heads))
    return ffi::Error::InvalidArgument("mask must be [1 or B, 1 or H, Tq, Tk]");
  return ffi::Error::Success();
}

// Separate q [B, Tq, H, D], k [B, Tk, H, D], v [B, Tk, H, Dv].
Shapes separate_shapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::U8>& mask) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  return Shapes{qd[0], qd[1], kd[1], qd[2], qd[3], vd[3], md.size() == 4 ? md[0] : 0,
                md.size() == 4 ? md[1] : 0};
}

// Fused qkv [B, T, 3, H, D]: self-attention, Tq = Tk = T, Dv = D.
Shapes fused_shapes(const ffi::Buffer<ffi::F32>& qkv, const ffi::Buffer<ffi::U8>& mask) {
  auto d = qkv.dimensions(), md = mask.dimensions();
  return Shapes{d[0], d[1], d[1], d[3], d[4], d[4], md.size() == 4 ? md[0] : 0,
                md.size() == 4 ? md[1] : 0};
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> mask,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                            float scale) {
  const Shapes sh = separate_shapes(q, k, v, mask);
  if (ffi::Error e = check_mask(sh, mask); e.failure()) return e;
  forward(pool, sh, {q.typed_data(), sh.heads * sh.d}, {k.typed_data(), sh.heads * sh.d},
          {v.typed_data(), sh.heads * sh.dv}, mask.typed_data(), out->typed_data(),
          lse->typed_data(), scale);
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> mask,
                             ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> ct_out, ffi::ResultBuffer<ffi::F32> ct_q,
                             ffi::ResultBuffer<ffi::F32> ct_k, ffi::ResultBuffer<ffi::F32> ct_v,
                             float scale) {
  const Shapes sh = separate_shapes(q, k, v, mask);
  if (ffi::Error e = check_mask(sh, mask); e.failure()) return e;
  const int64_t qk = sh.heads * sh.d, vr = sh.heads * sh.dv;
  backward(pool, sh, {q.typed_data(), qk}, {k.typed_data(), qk}, {v.typed_data(), vr},
           mask.typed_data(), out.typed_data(), lse.typed_data(), ct_out.typed_data(),
           {ct_q->typed_data(), qk}, {ct_k->typed_data(), qk}, {ct_v->typed_data(), vr}, scale);
  return ffi::Error::Success();
}

ffi::Error AttentionQkvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::U8> mask,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                               float scale) {
  if (qkv.dimensions().size() != 5 || qkv.dimensions()[2] != 3)
    return ffi::Error::InvalidArgument("qkv must be [B, T, 3, H, D]");
  const Shapes sh = fused_shapes(qkv, mask);
  if (ffi::Error e = check_mask(sh, mask); e.failure()) return e;
  const float* base = qkv.typed_data();
  const int64_t hd = sh.heads * sh.d;
  forward(pool, sh, {base, 3 * hd}, {base + hd, 3 * hd}, {base + 2 * hd, 3 * hd}, mask.typed_data(),
          out->typed_data(), lse->typed_data(), scale);
  return ffi::Error::Success();
}

ffi::Error AttentionQkvBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::U8> mask,
                                ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                                ffi::Buffer<ffi::F32> ct_out,
                                ffi::ResultBuffer<ffi::F32> ct_qkv, float scale) {
  if (qkv.dimensions().size() != 5 || qkv.dimensions()[2] != 3)
    return ffi::Error::InvalidArgument("qkv must be [B, T, 3, H, D]");
  const Shapes sh = fused_shapes(qkv, mask);
  if (ffi::Error e = check_mask(sh, mask); e.failure()) return e;
  const float* base = qkv.typed_data();
  float* grad = ct_qkv->typed_data();
  const int64_t hd = sh.heads * sh.d;
  backward(pool, sh, {base, 3 * hd}, {base + hd, 3 * hd}, {base + 2 * hd, 3 * hd}, mask.typed_data(),
           out.typed_data(), lse.typed_data(), ct_out.typed_data(), {grad, 3 * hd},
           {grad + hd, 3 * hd}, {grad + 2 * hd, 3 * hd}, scale);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, Tq, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [B, Tk, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [B, Tk, H, Dv]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [Bm, Hm, Tq, Tk]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, Tq, H, Dv]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [B, H, Tq]
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_v
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibAttentionQkvForward, AttentionQkvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv [B, T, 3, H, D]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [Bm, Hm, T, T]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, T, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [B, H, T]
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibAttentionQkvBackward, AttentionQkvBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ct_qkv [B, T, 3, H, D]
                                  .Attr<float>("scale"));
