// ATen glue of the epilogue ops on CUDA (compiled only in CUDA builds, FASTGRPO_WITH_CUDA): checks, device guard,
// current stream, launch. The kernels are in epilogue.cu / epilogue_kernels.cuh.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "../ops.h"
#include "epilogue_checks.h"
#include "epilogue_cuda.h"

namespace fastgrpo {

Tensor3 lse_logp_entropy_cuda(const at::Tensor& z, const at::Tensor& targets_in, double inv_temp) {
  epilogue::check_fwd_args("fastgrpo::lse_logp_entropy", z, targets_in, inv_temp);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor targets = targets_in.contiguous();
  const int64_t C = z.size(0), V = z.size(1);
  const auto opts = z.options().dtype(at::kFloat);
  at::Tensor lse = z.new_empty({C}, opts), logp = z.new_empty({C}, opts), entropy = z.new_empty({C}, opts);
  if (C == 0) return {lse, logp, entropy};
  const epilogue::FwdArgs args{z.data_ptr(), epilogue::ztype_of(z), targets.data_ptr<int64_t>(), V,
                               static_cast<float>(inv_temp), lse.data_ptr<float>(), logp.data_ptr<float>(),
                               entropy.data_ptr<float>()};
  C10_CUDA_CHECK(epilogue::cuda::launch_lse_logp_entropy(args, C, c10::cuda::getCurrentCUDAStream()));
  return {lse, logp, entropy};
}

void logits_grad_cuda(const at::Tensor& z, const at::Tensor& targets_in, const at::Tensor& lse_in,
                      const at::Tensor& entropy_in, const at::Tensor& c_logp_in,
                      const std::optional<at::Tensor>& c_ent_in, double inv_temp) {
  epilogue::check_bwd_args("fastgrpo::logits_grad_", z, targets_in, lse_in, entropy_in, c_logp_in, c_ent_in,
                           inv_temp);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t C = z.size(0), V = z.size(1);
  if (C == 0) return;
  const at::Tensor targets = targets_in.contiguous(), lse = lse_in.contiguous(), entropy = entropy_in.contiguous(),
                   c_logp = c_logp_in.contiguous();
  at::Tensor c_ent;
  if (c_ent_in.has_value()) c_ent = c_ent_in->contiguous();
  const epilogue::BwdArgs args{z.data_ptr(),
                               epilogue::ztype_of(z),
                               targets.data_ptr<int64_t>(),
                               lse.data_ptr<float>(),
                               entropy.data_ptr<float>(),
                               c_logp.data_ptr<float>(),
                               c_ent.defined() ? c_ent.data_ptr<float>() : nullptr,
                               V,
                               static_cast<float>(inv_temp)};
  C10_CUDA_CHECK(epilogue::cuda::launch_logits_grad(args, C, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace fastgrpo
