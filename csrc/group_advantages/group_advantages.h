// fastgrpo::group_advantages — the math, written once for the CPU (group_advantages.cpp) and the GPU
// (group_advantages.cu). Plain C++ / CUDA C++: no torch header, so nvcc compiles the .cu on its own.
//
// Mirrors fastgrpo/advantages.py (the spec) operation by operation, in the rewards' dtype T (float or double):
//
//   groups      CSR of the batch: members of group g in batch order (a stable counting sort), so every
//               per-group sum runs in the same order as the reference's sequential index_add_.
//   stats       shifted two-pass: pivot p = max_g x, ms = sum (x - p) / n, mean = p + ms,
//               std = sqrt(sum ((x - p) - ms)^2 / max(n - 1, 1))   (unbiased; exact 0 for all-equal groups)
//   CARE        (acc, confidence given) E_i = acc_i > thr & acc_i >= mean_g(acc);
//               mu_g = sum_E c / |E| (no bonus without eligible members);
//               bonus_i = coef * acc_i * [E_i & c_i >= mu_g - margin];  rewards <- rewards + bonus
//   centre      grpo / reinforce_pp: c_i = r_i - mean_g;  rloo: c_i = (r_i - mean_g) n / (n - 1), 0 if n = 1
//   scale       group: c / (std_g + eps); batch: c / (std_batch(r) + eps); none: c;
//               reinforce_pp: c / (std_batch(c) + eps) unless scale = none.  Batch std: fp64 sums.
//   COPO        (entropy [G] given) R_g = mean_g [* (1 - lam_g H_g), lam_g = (1 - 1/n) / log2 n, 0 for n = 1];
//               global_g = (R_g - mean R) / (std_u R + copo_eps) with the shifted statistics over the G groups;
//               blend_g = sigmoid(k (H_g - b)).
//
// Products that feed a sum use mul_rn / add_rn so that nvcc cannot contract them into an FMA the reference
// (and the CPU build, compiled with -ffp-contract=off) does not have: CPU and GPU give the same bits.

#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FG_HD __host__ __device__ __forceinline__
#else
#define FG_HD inline
#endif

namespace fastgrpo::group_adv {

enum class Estimator : int { kGrpo = 0, kRloo = 1, kReinforcePP = 2 };
enum class Scale : int { kGroup = 0, kBatch = 1, kNone = 2 };

template <typename T>
struct Params {
  int64_t B = 0;  // completions
  int64_t G = 0;  // groups
  const T* rewards = nullptr;     // [B]
  const int64_t* index = nullptr;  // [B], values in [0, G)
  Estimator estimator = Estimator::kGrpo;
  Scale scale = Scale::kGroup;
  T eps = T(1e-4);
  // GRPO-CARE, on when acc != nullptr
  const T* acc = nullptr;         // [B]
  const T* confidence = nullptr;  // [B]
  T care_coefficient = T(0.5), care_margin = T(0), care_acc_threshold = T(0.1);
  // COPO, on when entropy != nullptr
  const T* entropy = nullptr;  // [G], answer entropy in bits
  T copo_k = T(5), copo_b = T(1), copo_eps = T(1e-6);
  bool copo_entropy_coef = false;
  // outputs
  T* advantages = nullptr;  // [B]
  T* bonus = nullptr;       // [B] when CARE
  T* mean = nullptr;        // [G]
  T* std = nullptr;         // [G]
  T* global_adv = nullptr;  // [G] when COPO
  T* blend = nullptr;       // [G] when COPO
  // workspace
  int32_t* offsets = nullptr;  // [G + 1]
  int32_t* members = nullptr;  // [B]
  int32_t* cursor = nullptr;   // [G]
  T* total = nullptr;          // [B] rewards + bonus (CARE only)
};

template <typename T>
FG_HD T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

template <typename T>
FG_HD T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

template <typename T>
FG_HD T max_nan(T a, T b) {  // like torch amax: NaN wins
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

template <typename T>
struct Stats {
  T mean, std, pivot, mean_shift;
};

// Shifted two-pass statistics of x[at(0..n-1)], summed in that order.
template <typename T, typename At>
FG_HD Stats<T> shifted_stats(const T* x, int32_t n, At at) {
  T pivot = static_cast<T>(-HUGE_VAL);  // -inf (numeric_limits is host-only in CUDA)
  for (int32_t j = 0; j < n; ++j) pivot = max_nan(pivot, x[at(j)]);
  T s = T(0);
  for (int32_t j = 0; j < n; ++j) s = add_rn(s, x[at(j)] - pivot);
  const T ms = s / T(n);
  T m2 = T(0);
  for (int32_t j = 0; j < n; ++j) {
    const T dev = (x[at(j)] - pivot) - ms;
    m2 = add_rn(m2, mul_rn(dev, dev));
  }
  const T denom = n - 1 > 1 ? T(n - 1) : T(1);
  return {pivot + ms, std::sqrt(m2 / denom), pivot, ms};
}

// GRPO-CARE bonus for the members of one group; writes bonus[i] and total[i] = rewards[i] + bonus[i].
template <typename T>
FG_HD void care_group(const Params<T>& p, const int32_t* mem, int32_t n) {
  auto at = [mem](int32_t j) { return mem[j]; };
  const T acc_mean = shifted_stats(p.acc, n, at).mean;
  T n_e = T(0), s_e = T(0);
  for (int32_t j = 0; j < n; ++j) {
    const int32_t i = mem[j];
    const bool e = p.acc[i] > p.care_acc_threshold && p.acc[i] >= acc_mean;
    if (e) {
      n_e = add_rn(n_e, T(1));
      s_e = add_rn(s_e, p.confidence[i]);
    }
  }
  const bool has = n_e > T(0);
  const T mu = has ? s_e / n_e : T(0);
  const T floor_c = mu - p.care_margin;
  for (int32_t j = 0; j < n; ++j) {
    const int32_t i = mem[j];
    const bool e = p.acc[i] > p.care_acc_threshold && p.acc[i] >= acc_mean;
    const bool gets = e && has && p.confidence[i] >= floor_c;
    const T b = mul_rn(mul_rn(p.care_coefficient, p.acc[i]), gets ? T(1) : T(0));
    p.bonus[i] = b;
    p.total[i] = add_rn(p.rewards[i], b);
  }
}

// Group statistics and centred rewards of one group: writes mean[g], std[g] and advantages[i] = c_i.
template <typename T>
FG_HD void centre_group(const Params<T>& p, const T* r, int64_t g, const int32_t* mem, int32_t n) {
  auto at = [mem](int32_t j) { return mem[j]; };
  const Stats<T> st = shifted_stats(r, n, at);
  p.mean[g] = st.mean;
  p.std[g] = st.std;
  const T nn = T(n);
  for (int32_t j = 0; j < n; ++j) {
    const int32_t i = mem[j];
    T c = r[i] - st.mean;
    if (p.estimator == Estimator::kRloo) c = n > 1 ? mul_rn(c, nn) / (nn - T(1)) : T(0);
    p.advantages[i] = c;
  }
}

// What the final division uses: the group std, a batch std (over r or over c) or nothing.
enum class Divisor : int { kGroupStd = 0, kBatchStdRewards = 1, kBatchStdCentred = 2, kNone = 3 };

template <typename T>
FG_HD Divisor divisor_of(const Params<T>& p) {
  if (p.estimator == Estimator::kReinforcePP) return p.scale == Scale::kNone ? Divisor::kNone : Divisor::kBatchStdCentred;
  if (p.scale == Scale::kGroup) return Divisor::kGroupStd;
  if (p.scale == Scale::kBatch) return Divisor::kBatchStdRewards;
  return Divisor::kNone;
}

// sqrt(sum (x - mean)^2 / max(n - 1, 1)) from fp64 sums: sum_x, then sum_d2 with the fp64 mean.
FG_HD double batch_std_from_sums(double sum_d2, int64_t n) {
  return std::sqrt(sum_d2 / static_cast<double>(n - 1 > 1 ? n - 1 : 1));
}

// COPO global reward of group g (needs mean[g] and the group size).
template <typename T>
FG_HD T copo_global_reward(const Params<T>& p, int64_t g, int32_t n) {
  if (!p.copo_entropy_coef) return p.mean[g];
  const T cnt = T(n);
  const T lam = n > 1 ? (T(1) - T(1) / cnt) / std::log2(cnt) : T(0);
  return mul_rn(p.mean[g], T(1) - mul_rn(lam, p.entropy[g]));
}

template <typename T>
FG_HD T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

}  // namespace fastgrpo::group_adv
