// The op implementations that bindings.cpp registers (TORCH_LIBRARY_IMPL), one declaration per backend.
// Kept apart from torch/library.h so that the op files compile with ATen/core/Tensor.h alone.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace fastgrpo {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// epilogue/epilogue.cpp
Tensor3 lse_logp_entropy_cpu(const at::Tensor& z, const at::Tensor& targets, double inv_temp);
void logits_grad_cpu(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                     const at::Tensor& c_logp, const std::optional<at::Tensor>& c_ent, double inv_temp);

// group_advantages/group_advantages.cpp
Tensor6 group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& index, int64_t num_groups,
                             std::string_view estimator, std::string_view scale, double eps,
                             const std::optional<at::Tensor>& care_acc,
                             const std::optional<at::Tensor>& care_confidence, double care_coefficient,
                             double care_margin, double care_acc_threshold,
                             const std::optional<at::Tensor>& copo_entropy, double copo_k, double copo_b,
                             double copo_eps, bool copo_entropy_coef);

#if defined(FASTGRPO_WITH_CUDA)
// epilogue/epilogue_cuda.cpp
Tensor3 lse_logp_entropy_cuda(const at::Tensor& z, const at::Tensor& targets, double inv_temp);
void logits_grad_cuda(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                      const at::Tensor& c_logp, const std::optional<at::Tensor>& c_ent, double inv_temp);

// group_advantages/group_advantages_cuda.cpp
Tensor6 group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& index, int64_t num_groups,
                              std::string_view estimator, std::string_view scale, double eps,
                              const std::optional<at::Tensor>& care_acc,
                              const std::optional<at::Tensor>& care_confidence, double care_coefficient,
                              double care_margin, double care_acc_threshold,
                              const std::optional<at::Tensor>& copo_entropy, double copo_k, double copo_b,
                              double copo_eps, bool copo_entropy_coef);
#endif

}  // namespace fastgrpo
