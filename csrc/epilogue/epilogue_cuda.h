// Host launchers of the CUDA epilogue kernels (defined in epilogue.cu). Plain C++ + the CUDA runtime API:
// the ATen glue (epilogue_cuda.cpp) includes this, never the kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "epilogue.h"

namespace fastgrpo::epilogue::cuda {

// Rows [0, C) of args; returns the launch status (cudaGetLastError).
cudaError_t launch_lse_logp_entropy(const FwdArgs& args, int64_t C, cudaStream_t stream);
cudaError_t launch_logits_grad(const BwdArgs& args, int64_t C, cudaStream_t stream);

}  // namespace fastgrpo::epilogue::cuda
