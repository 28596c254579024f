// The CPU epilogue row kernels, written once with at::vec and compiled once per instruction set:
// epilogue_cpu_default.cpp (baseline x86-64 / any CPU) and epilogue_cpu_avx2.cpp (-mavx2 -mfma -mf16c, built by
// setup.py into a separate static library). The includer defines FASTGRPO_ISA_NS (cpu_default / cpu_avx2) and,
// for AVX2, CPU_CAPABILITY / CPU_CAPABILITY_AVX2 so that at::vec picks its 256-bit specialisations and lives
// in its own inline namespace (no symbol of one ISA can stand in for the other's at link time).
//
// Numerics, per row of x = z * inv_temp (fp32 in registers whatever the storage dtype):
//   forward  two reads: m = max x; then S = sum e^u, Q = sum e^u u with u = x - m (no rescaling needed).
//            The sums are blocked: fp32 vector partial sums over tiles of kTile elements, added in fp64, so the
//            rounding error does not grow with V. lse = m + log S, entropy = log S - Q/S and
//            logp = u_y - log S are formed from shifted quantities only: no cancellation at |x| ~ 1e4.
//   gradient two reads, one write: the row's max m and log S are recomputed (see bwd_row), then
//            p = e^(u - log S), d = x - Ex = u - (log S - entropy),
//            g = inv_temp * (-c_logp p - c_ent p d) + [v == y] inv_temp c_logp; written as
//            fmadd(b, p*d, p*a) so that a -inf logit (p = 0) gives exactly 0, never 0 * inf.
// This header must not define static data (it is compiled with AVX2 flags; see ATen's note
// "Do not compile initializers with AVX").

#ifndef FASTGRPO_ISA_NS
#error "define FASTGRPO_ISA_NS before including epilogue_cpu_kernel.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <type_traits>

#include "epilogue.h"

namespace fastgrpo::epilogue::FASTGRPO_ISA_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
// one step = two float vectors = one vector of a 16-bit type
constexpr int64_t kStep = 2 * Vec::size();
// elements summed in fp32 before the partial sums go to fp64 (16 KB of fp32: stays in L1)
constexpr int64_t kTile = 4096;
static_assert(kTile % kStep == 0, "tile must hold whole steps");

template <typename T>
inline void load2(const T* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  } else {
    static_assert(at::vec::Vectorized<T>::size() == kStep, "16-bit vector must hold two float vectors");
    auto v = at::vec::Vectorized<T>::loadu(p);
    auto ab = at::vec::convert_to_float<T>(v);
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
}

template <typename T>
inline void store2(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + Vec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

inline float hmax(const Vec& v) {
  float buf[Vec::size()];
  v.store(buf);
  float m = buf[0];
  for (int i = 1; i < Vec::size(); ++i) m = std::max(m, buf[i]);
  return m;
}

inline double hsum(const Vec& v) {
  float buf[Vec::size()];
  v.store(buf);
  double s = 0.0;
  for (int i = 0; i < Vec::size(); ++i) s += buf[i];
  return s;
}

// m = max_v x_v of one row (inv_temp > 0, so max x = inv_temp * max z exactly); 0 for a row of +-inf.
template <typename T>
float row_max(const T* z, int64_t V, float it) {
  const int64_t Vb = V - V % kStep;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  Vec m0(kNegInf), m1(kNegInf);
  for (int64_t v = 0; v < Vb; v += kStep) {
    Vec a, b;
    load2(z + v, a, b);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
  }
  float zmax = hmax(at::vec::maximum(m0, m1));
  for (int64_t v = Vb; v < V; ++v) zmax = std::max(zmax, static_cast<float>(z[v]));
  const float mx = zmax * it;
  return std::isfinite(mx) ? mx : 0.f;  // a row of -inf or +inf: let IEEE arithmetic give the result
}

// S = sum e^u and (kQ) Q = sum e^u u with u = x - mx, clamped below so that e^u = 0 contributes 0 * finite.
template <typename T, bool kQ>
void row_sums(const T* z, int64_t V, float it, float mx, double& S, double& Q) {
  const int64_t Vb = V - V % kStep;
  const Vec vit(it), vneg(-mx), vlo(-FLT_MAX);
  S = 0.0;
  Q = 0.0;
  for (int64_t t0 = 0; t0 < Vb; t0 += kTile) {
    const int64_t t1 = std::min(t0 + kTile, Vb);
    Vec s0(0.f), s1(0.f), q0(0.f), q1(0.f);
    for (int64_t v = t0; v < t1; v += kStep) {
      Vec a, b;
      load2(z + v, a, b);
      const Vec ua = at::vec::maximum(at::vec::fmadd(a, vit, vneg), vlo);
      const Vec ub = at::vec::maximum(at::vec::fmadd(b, vit, vneg), vlo);
      const Vec ea = ua.exp();
      const Vec eb = ub.exp();
      s0 = s0 + ea;
      s1 = s1 + eb;
      if constexpr (kQ) {
        q0 = at::vec::fmadd(ea, ua, q0);
        q1 = at::vec::fmadd(eb, ub, q1);
      }
    }
    S += hsum(s0 + s1);
    if constexpr (kQ) Q += hsum(q0 + q1);
  }
  for (int64_t v = Vb; v < V; ++v) {
    const float u = std::max(std::fma(static_cast<float>(z[v]), it, -mx), -FLT_MAX);
    const float e = std::exp(u);
    S += e;
    if constexpr (kQ) Q += static_cast<double>(e) * u;
  }
}

template <typename T>
void fwd_row(const T* z, int64_t V, float it, int64_t y, float* lse, float* logp, float* entropy) {
  const float mx = row_max(z, V, it);
  double S, Q;
  row_sums<T, true>(z, V, it, mx, S, Q);
  const double ls = std::log(S);
  *lse = static_cast<float>(mx + ls);
  *entropy = static_cast<float>(ls - Q / S);
  *logp = static_cast<float>(static_cast<double>(std::fma(static_cast<float>(z[y]), it, -mx)) - ls);
}

// The gradient recomputes the row's shifted log-partition (m, log S) instead of using the stored fp32 lse:
// near |x| ~ 1e4 the rounding of lse alone (~5e-4) would scale every p by that relative error. All
// differences are taken against m, so no two numbers near 1e4 are ever subtracted after rounding.
template <typename T, bool kHasEnt>
void bwd_row(T* z, int64_t V, float it, int64_t y, float entropy, float c_logp, float c_ent) {
  const int64_t Vb = V - V % kStep;
  const float mx = row_max(z, V, it);
  double S, Q;
  row_sums<T, false>(z, V, it, mx, S, Q);
  const float ls = static_cast<float>(std::log(S));
  const float nmx = -mx;
  const float exm = static_cast<float>(static_cast<double>(ls) - static_cast<double>(entropy));  // E_p[x] - m
  const float a = -it * c_logp;
  const float b = -it * c_ent;
  const float zy = static_cast<float>(z[y]);  // read before the sweep overwrites it

  const Vec vit(it), vnm(nmx), vls(ls), vne(exm), va(a), vb(b), vlo(-FLT_MAX);
  for (int64_t v = 0; v < Vb; v += kStep) {
    Vec za, zb;
    load2(z + v, za, zb);
    const Vec ua = at::vec::maximum(at::vec::fmadd(za, vit, vnm), vlo);
    const Vec ub = at::vec::maximum(at::vec::fmadd(zb, vit, vnm), vlo);
    const Vec pa = (ua - vls).exp();
    const Vec pb = (ub - vls).exp();
    Vec ga, gb;
    if constexpr (kHasEnt) {
      ga = at::vec::fmadd(vb, pa * (ua - vne), pa * va);
      gb = at::vec::fmadd(vb, pb * (ub - vne), pb * va);
    } else {
      ga = pa * va;
      gb = pb * va;
    }
    store2(z + v, ga, gb);
  }
  auto grad_at = [&](float zv) {
    const float u = std::max(std::fma(zv, it, nmx), -FLT_MAX);
    const float p = std::exp(u - ls);
    if constexpr (kHasEnt) {
      return std::fma(b, p * (u - exm), p * a);
    } else {
      return p * a;
    }
  };
  for (int64_t v = Vb; v < V; ++v) z[v] = static_cast<T>(grad_at(static_cast<float>(z[v])));
  z[y] = static_cast<T>(grad_at(zy) + it * c_logp);
}

template <typename T>
void fwd_rows(const FwdArgs& a, int64_t begin, int64_t end) {
  const T* z = static_cast<const T*>(a.z);
  for (int64_t i = begin; i < end; ++i) {
    fwd_row<T>(z + i * a.V, a.V, a.inv_temp, a.targets[i], a.lse + i, a.logp + i, a.entropy + i);
  }
}

template <typename T>
void bwd_rows(const BwdArgs& a, int64_t begin, int64_t end) {
  T* z = static_cast<T*>(a.z);
  for (int64_t i = begin; i < end; ++i) {
    T* row = z + i * a.V;
    if (a.c_ent != nullptr) {
      bwd_row<T, true>(row, a.V, a.inv_temp, a.targets[i], a.entropy[i], a.c_logp[i], a.c_ent[i]);
    } else {
      bwd_row<T, false>(row, a.V, a.inv_temp, a.targets[i], a.entropy[i], a.c_logp[i], 0.f);
    }
  }
}

}  // namespace

void lse_logp_entropy_rows(const FwdArgs& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case ZType::kFloat:
      return fwd_rows<float>(args, begin, end);
    case ZType::kBFloat16:
      return fwd_rows<c10::BFloat16>(args, begin, end);
    case ZType::kHalf:
      return fwd_rows<c10::Half>(args, begin, end);
  }
}

void logits_grad_rows(const BwdArgs& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case ZType::kFloat:
      return bwd_rows<float>(args, begin, end);
    case ZType::kBFloat16:
      return bwd_rows<c10::BFloat16>(args, begin, end);
    case ZType::kHalf:
      return bwd_rows<c10::Half>(args, begin, end);
  }
}

}  // namespace fastgrpo::epilogue::FASTGRPO_ISA_NS
