// ATen glue of fastgrpo::group_advantages on CUDA (compiled only in CUDA builds): checks, workspace, launch.
// No host synchronisation: NaN/inf and out-of-range index values are not checked here (the CPU op and the
// Python wrappers do).

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>

#include "../ops.h"
#include "group_advantages_checks.h"
#include "group_advantages_cuda.h"

namespace fastgrpo {
namespace {

template <typename T>
void run_cuda(const group_adv::Checked& c, const group_adv::Outputs& out, double eps, double care_coefficient,
              double care_margin, double care_acc_threshold, double copo_k, double copo_b, double copo_eps,
              bool copo_entropy_coef) {
  group_adv::Params<T> p = group_adv::make_params<T>(c, out, eps, care_coefficient, care_margin, care_acc_threshold,
                                                     copo_k, copo_b, copo_eps, copo_entropy_coef);
  // int32 workspace: offsets [G + 1], members [B], cursor [G]
  at::Tensor iws = c.index.new_empty({2 * c.G + 1 + c.B}, c.index.options().dtype(at::kInt));
  p.offsets = iws.data_ptr<int32_t>();
  p.members = p.offsets + c.G + 1;
  p.cursor = p.members + c.B;
  at::Tensor total;
  if (c.acc.defined()) {
    total = c.rewards.new_empty({c.B});
    p.total = total.data_ptr<T>();
  }
  C10_CUDA_CHECK(group_adv::cuda::launch_group_advantages<T>(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

Tensor6 group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& index, int64_t num_groups,
                              std::string_view estimator, std::string_view scale, double eps,
                              const std::optional<at::Tensor>& care_acc,
                              const std::optional<at::Tensor>& care_confidence, double care_coefficient,
                              double care_margin, double care_acc_threshold,
                              const std::optional<at::Tensor>& copo_entropy, double copo_k, double copo_b,
                              double copo_eps, bool copo_entropy_coef) {
  const group_adv::Checked c = group_adv::check_args(
      rewards, index, num_groups, std::string(estimator), std::string(scale), eps, care_acc, care_confidence,
      care_coefficient, care_margin, care_acc_threshold, copo_entropy, copo_k, copo_b, copo_eps);
  const c10::cuda::CUDAGuard guard(rewards.device());
  group_adv::Outputs out = group_adv::allocate_outputs(c);
  if (c.rewards.scalar_type() == at::kDouble) {
    run_cuda<double>(c, out, eps, care_coefficient, care_margin, care_acc_threshold, copo_k, copo_b, copo_eps,
                     copo_entropy_coef);
  } else {
    run_cuda<float>(c, out, eps, care_coefficient, care_margin, care_acc_threshold, copo_k, copo_b, copo_eps,
                    copo_entropy_coef);
  }
  return out;
}

}  // namespace fastgrpo
