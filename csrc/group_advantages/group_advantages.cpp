// fastgrpo::group_advantages on CPU: a sequential pass (B is a rollout batch, thousands of completions; the op is
// a few microseconds) over the CSR of the groups, the same per-group functions as the CUDA kernel.

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../ops.h"
#include "group_advantages.h"
#include "group_advantages_checks.h"

namespace fastgrpo::group_adv {
namespace {

template <typename T>
void check_finite(const char* name, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(std::isfinite(x[i]), kOp, ": ", name, " must be finite, got ", x[i], " at position ", i,
                " (NaN/inf in rewards would give a silent NaN loss)");
  }
}

template <typename T>
void run_cpu(Params<T>& p) {
  const int64_t B = p.B, G = p.G;
  // CSR of the groups, stable: members of each group in batch order
  std::vector<int32_t> offsets(G + 1, 0), members(B), cursor(G);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t g = p.index[i];
    TORCH_CHECK(g >= 0 && g < G, kOp, ": index[", i, "] = ", g, " is outside [0, num_groups) = [0, ", G, ")");
    ++offsets[g + 1];
  }
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(offsets[g + 1] > 0, kOp, ": group ", g, " of num_groups = ", G,
                " has no member; index must use every group id in [0, num_groups) (fastgrpo.advantages.group_index)");
    offsets[g + 1] += offsets[g];
    cursor[g] = offsets[g];
  }
  for (int64_t i = 0; i < B; ++i) members[cursor[p.index[i]]++] = static_cast<int32_t>(i);

  std::vector<T> total;
  const T* r = p.rewards;
  if (p.acc != nullptr) {
    total.resize(B);
    p.total = total.data();
    for (int64_t g = 0; g < G; ++g) care_group(p, members.data() + offsets[g], offsets[g + 1] - offsets[g]);
    r = p.total;
  }
  for (int64_t g = 0; g < G; ++g) centre_group(p, r, g, members.data() + offsets[g], offsets[g + 1] - offsets[g]);

  const Divisor div = divisor_of(p);
  if (div == Divisor::kGroupStd) {
    for (int64_t i = 0; i < B; ++i) p.advantages[i] = p.advantages[i] / (p.std[p.index[i]] + p.eps);
  } else if (div == Divisor::kBatchStdRewards || div == Divisor::kBatchStdCentred) {
    const T* x = div == Divisor::kBatchStdRewards ? r : p.advantages;
    double s = 0.0;
    for (int64_t i = 0; i < B; ++i) s += static_cast<double>(x[i]);
    const double m = s / static_cast<double>(B);
    double d2 = 0.0;
    for (int64_t i = 0; i < B; ++i) {
      const double d = static_cast<double>(x[i]) - m;
      d2 += d * d;
    }
    const T denom = static_cast<T>(batch_std_from_sums(d2, B)) + p.eps;
    for (int64_t i = 0; i < B; ++i) p.advantages[i] = p.advantages[i] / denom;
  }

  if (p.entropy != nullptr) {
    for (int64_t g = 0; g < G; ++g) p.global_adv[g] = copo_global_reward(p, g, offsets[g + 1] - offsets[g]);
    const Stats<T> st = shifted_stats(p.global_adv, static_cast<int32_t>(G), [](int32_t j) { return j; });
    for (int64_t g = 0; g < G; ++g) {
      p.global_adv[g] = (p.global_adv[g] - st.mean) / (st.std + p.copo_eps);
      p.blend[g] = sigmoid(mul_rn(p.copo_k, p.entropy[g] - p.copo_b));
    }
  }
}

template <typename T>
void checked_run(const Checked& c, const Outputs& out, double eps, double care_coefficient, double care_margin,
                 double care_acc_threshold, double copo_k, double copo_b, double copo_eps, bool copo_entropy_coef) {
  check_finite("rewards", c.rewards.data_ptr<T>(), c.B);
  if (c.acc.defined()) {
    check_finite("care_acc", c.acc.data_ptr<T>(), c.B);
    check_finite("care_confidence", c.confidence.data_ptr<T>(), c.B);
  }
  if (c.entropy.defined()) check_finite("copo_entropy", c.entropy.data_ptr<T>(), c.G);
  Params<T> p = make_params<T>(c, out, eps, care_coefficient, care_margin, care_acc_threshold, copo_k, copo_b,
                               copo_eps, copo_entropy_coef);
  run_cpu(p);
}

}  // namespace
}  // namespace fastgrpo::group_adv

namespace fastgrpo {

Tensor6 group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& index, int64_t num_groups,
                             std::string_view estimator, std::string_view scale, double eps,
                             const std::optional<at::Tensor>& care_acc,
                             const std::optional<at::Tensor>& care_confidence, double care_coefficient,
                             double care_margin, double care_acc_threshold,
                             const std::optional<at::Tensor>& copo_entropy, double copo_k, double copo_b,
                             double copo_eps, bool copo_entropy_coef) {
  using namespace group_adv;
  const Checked c = check_args(rewards, index, num_groups, std::string(estimator), std::string(scale), eps, care_acc,
                               care_confidence, care_coefficient, care_margin, care_acc_threshold, copo_entropy,
                               copo_k, copo_b, copo_eps);
  Outputs out = allocate_outputs(c);
  if (c.rewards.scalar_type() == at::kDouble) {
    checked_run<double>(c, out, eps, care_coefficient, care_margin, care_acc_threshold, copo_k, copo_b, copo_eps,
                        copo_entropy_coef);
  } else {
    checked_run<float>(c, out, eps, care_coefficient, care_margin, care_acc_threshold, copo_k, copo_b, copo_eps,
                       copo_entropy_coef);
  }
  return out;
}

}  // namespace fastgrpo
