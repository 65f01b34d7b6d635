// One AdamW step of one parameter array as one native call, for XLA:CPU
// through its FFI: the parameters and both moments read and written in one
// pass, in place.
//
// optax's AdamW is three transformations whose XLA program is three loops per
// array (the first moment, the second, then the parameters reading both),
// one after another: ~10 array reads and writes where one pass needs 7, and
// on the benchmark MLP's first layer 0.38 ms of dependent loops on one core.
// Here each chunk of elements is updated whole, the chunks shared among the
// threads of XLA's pool; a vmapped ensemble's arrays come as one batch,
// each member with its own step's scalars. The arithmetic is optax's, in its
// order, except that the bias corrections multiply by their reciprocals:
//
//   mu' = (1 - b1) g + b1 mu            nu' = (1 - b2) g^2 + b2 nu
//   u = (mu' * (1 / c1)) / (sqrt(nu' * (1 / c2)) + eps) + wd p
//   p' = p + (-lr) u                    (c1 = 1 - b1^t, c2 = 1 - b2^t)
//
// optax divides by c1 and c2: three divisions and a square root per element,
// and the divider, not memory, set the pace (the benchmark MLP's first-layer
// weights, 0.22 ms a call; 0.175 with one division, as PyTorch's fused AdamW
// has; each product differs from the quotient by at most one rounding).
//
// unless the step's `keep` scalar is set (a guarded step whose gradient was
// not finite): then p, mu and nu come back as they were, so a guard needs no
// select over the state afterwards (under vmap, per member).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace nnlib_native;

constexpr int64_t kChunk = 16384;  // elements per claim (4 arrays x 64 KB)

#if defined(__AVX512F__)
inline vf vsqrt(vf x) { return reinterpret_cast<vf>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x))); }
#elif defined(__AVX__)
inline vf vsqrt(vf x) { return reinterpret_cast<vf>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x))); }
#else
inline vf vsqrt(vf x) {
  for (int i = 0; i < kVec; ++i) x[i] = std::sqrt(x[i]);
  return x;
}
#endif

ffi::Error AdamW(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> params, ffi::Buffer<ffi::F32> grads,
                 ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu,
                 ffi::Buffer<ffi::F32> scalars, ffi::ResultBuffer<ffi::F32> params_out,
                 ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out) {
  const int64_t n = static_cast<int64_t>(params.element_count());
  // scalars: [members, kScalars], one row per array of a batch of them (a
  // vmapped ensemble: params [members, ...]), each row the step's scalars as
  // the caller rounded them to float32 (1 - b1 from the float64 b1, as
  // optax's Python arithmetic does): -lr, 1 - b1, b1, 1 - b2, b2, eps, wd,
  // c1, c2, keep (non-zero: leave this member's arrays as they are).
  constexpr int64_t kScalars = 10;
  const int64_t members = static_cast<int64_t>(scalars.element_count()) / kScalars;
  if (static_cast<int64_t>(grads.element_count()) != n ||
      static_cast<int64_t>(mu.element_count()) != n ||
      static_cast<int64_t>(nu.element_count()) != n ||
      static_cast<int64_t>(scalars.element_count()) != kScalars * members || members == 0 ||
      n % members != 0)
    return ffi::Error::InvalidArgument(
        "adamw: params, grads, mu, nu sizes differ, or scalars are not [members, 10]");
  const int64_t per_member = n / members;
  const float* p = params.typed_data();
  const float* g = grads.typed_data();
  const float* m = mu.typed_data();
  const float* v = nu.typed_data();
  float* p2 = params_out->typed_data();
  float* m2 = mu_out->typed_data();
  float* v2 = nu_out->typed_data();
  const int64_t member_chunks = (per_member + kChunk - 1) / kChunk;
  Phases phases(1);
  auto job = [&] {
    phases.run(0, members * member_chunks, [&](int64_t q) {
      const int64_t member = q / member_chunks;
      const float* s = scalars.typed_data() + kScalars * member;
      const float neg_lr = s[0], a1 = s[1], b1 = s[2], a2 = s[3], b2 = s[4], eps = s[5],
                  wd = s[6], r1 = 1.0f / s[7], r2 = 1.0f / s[8];
      const int64_t base = member * per_member;
      const int64_t begin = base + q % member_chunks * kChunk;
      const int64_t end = base + std::min(per_member, (q % member_chunks + 1) * kChunk);
      if (s[9] != 0.0f) {  // kept: the outputs are the inputs (copied unless aliased)
        const size_t bytes = static_cast<size_t>(end - begin) * sizeof(float);
        if (p2 != p) std::memcpy(p2 + begin, p + begin, bytes);
        if (m2 != m) std::memcpy(m2 + begin, m + begin, bytes);
        if (v2 != v) std::memcpy(v2 + begin, v + begin, bytes);
        return;
      }
      for (int64_t i = begin; i < end; i += kVec) {
        const int64_t k = std::min<int64_t>(kVec, end - i);
        const vf gv = load_n(g + i, k), pv = load_n(p + i, k);
        const vf mv = splat(a1) * gv + splat(b1) * load_n(m + i, k);
        const vf vv = splat(a2) * (gv * gv) + splat(b2) * load_n(v + i, k);
        const vf u = (mv * splat(r1)) / (vsqrt(vv * splat(r2)) + splat(eps)) + splat(wd) * pv;
        store_n(m2 + i, mv, k);
        store_n(v2 + i, vv, k);
        store_n(p2 + i, pv + splat(neg_lr) * u, k);
      }
    });
  };
  run_job(pool, job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // params
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grads
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mu
                                  .Arg<ffi::Buffer<ffi::F32>>()  // nu
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scalars [members, 10]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // params'
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mu'
                                  .Ret<ffi::Buffer<ffi::F32>>());  // nu'
