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

Tensor3 lse_logp_entropy_cuda(const at::Tensor& z, const at::Tensor& targets, double inv_temp) {
  epilogue::check_fwd_args("fastgrpo::lse_logp_entropy", z, targets, inv_temp);
  const c10::cuda::CUDAGuard guard(z.device());
  const epilogue::FwdCall call = epilogue::fwd_call(z, targets, inv_temp);
  const int64_t C = z.size(0);
  if (C > 0) {
    C10_CUDA_CHECK(epilogue::cuda::launch_lse_logp_entropy(call.args, C, c10::cuda::getCurrentCUDAStream()));
  }
  return {call.lse, call.logp, call.entropy};
}

void logits_grad_cuda(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse,
                      const at::Tensor& entropy, const at::Tensor& c_logp, const std::optional<at::Tensor>& c_ent,
                      double inv_temp) {
  epilogue::check_bwd_args("fastgrpo::logits_grad_", z, targets, lse, entropy, c_logp, c_ent, inv_temp);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t C = z.size(0);
  if (C == 0) return;
  const epilogue::BwdCall call = epilogue::bwd_call(z, targets, lse, entropy, c_logp, c_ent, inv_temp);
  C10_CUDA_CHECK(epilogue::cuda::launch_logits_grad(call.args, C, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace fastgrpo
