// Launchers of the CUDA epilogue kernels: pick the row layout from V and the kernel from the dtype.
// Plain CUDA C++: `nvcc -c -arch=sm_90 epilogue.cu` compiles this file alone (tests/test_csrc_nvcc.py).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "epilogue_cuda.h"
#include "epilogue_kernels.cuh"

namespace fastgrpo::epilogue::cuda {
namespace {

// V <= kWarpRowMaxV: a warp per row, 8 rows per block; V <= kSmallBlockMaxV: 256 threads per row; else 512.
constexpr int64_t kWarpRowMaxV = 2048;
constexpr int64_t kSmallBlockMaxV = 16384;

unsigned grid_rows(int64_t C, int rows_per_block) {
  return static_cast<unsigned>((C + rows_per_block - 1) / rows_per_block);
}

template <typename T>
void launch_fwd(const FwdArgs& a, int64_t C, cudaStream_t s) {
  const T* z = static_cast<const T*>(a.z);
  if (a.V <= kWarpRowMaxV) {
    lse_logp_entropy_kernel<T, 32, 256>
        <<<grid_rows(C, 8), 256, 0, s>>>(z, a.targets, C, a.V, a.inv_temp, a.lse, a.logp, a.entropy);
  } else if (a.V <= kSmallBlockMaxV) {
    lse_logp_entropy_kernel<T, 256, 256>
        <<<grid_rows(C, 1), 256, 0, s>>>(z, a.targets, C, a.V, a.inv_temp, a.lse, a.logp, a.entropy);
  } else {
    lse_logp_entropy_kernel<T, 512, 512>
        <<<grid_rows(C, 1), 512, 0, s>>>(z, a.targets, C, a.V, a.inv_temp, a.lse, a.logp, a.entropy);
  }
}

template <typename T, bool kHasEnt>
void launch_bwd(const BwdArgs& a, int64_t C, cudaStream_t s) {
  T* z = static_cast<T*>(a.z);
  if (a.V <= kWarpRowMaxV) {
    logits_grad_kernel<T, 32, 256, kHasEnt><<<grid_rows(C, 8), 256, 0, s>>>(
        z, a.targets, a.lse, a.entropy, a.c_logp, a.c_ent, C, a.V, a.inv_temp);
  } else if (a.V <= kSmallBlockMaxV) {
    logits_grad_kernel<T, 256, 256, kHasEnt><<<grid_rows(C, 1), 256, 0, s>>>(
        z, a.targets, a.lse, a.entropy, a.c_logp, a.c_ent, C, a.V, a.inv_temp);
  } else {
    logits_grad_kernel<T, 512, 512, kHasEnt><<<grid_rows(C, 1), 512, 0, s>>>(
        z, a.targets, a.lse, a.entropy, a.c_logp, a.c_ent, C, a.V, a.inv_temp);
  }
}

template <typename T>
void launch_bwd_any(const BwdArgs& a, int64_t C, cudaStream_t s) {
  if (a.c_ent != nullptr) {
    launch_bwd<T, true>(a, C, s);
  } else {
    launch_bwd<T, false>(a, C, s);
  }
}

}  // namespace

cudaError_t launch_lse_logp_entropy(const FwdArgs& args, int64_t C, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  switch (args.dtype) {
    case ZType::kFloat:
      launch_fwd<float>(args, C, stream);
      break;
    case ZType::kBFloat16:
      launch_fwd<__nv_bfloat16>(args, C, stream);
      break;
    case ZType::kHalf:
      launch_fwd<__half>(args, C, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_logits_grad(const BwdArgs& args, int64_t C, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  switch (args.dtype) {
    case ZType::kFloat:
      launch_bwd_any<float>(args, C, stream);
      break;
    case ZType::kBFloat16:
      launch_bwd_any<__nv_bfloat16>(args, C, stream);
      break;
    case ZType::kHalf:
      launch_bwd_any<__half>(args, C, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace fastgrpo::epilogue::cuda
