// Host launcher of the CUDA group-advantage kernel (group_advantages.cu); plain C++ + the CUDA runtime API.
#pragma once

#include <cuda_runtime_api.h>

#include "group_advantages.h"

namespace fastgrpo::group_adv::cuda {

// One block does the whole batch (B is a rollout batch; the op is latency-bound). The workspace pointers of
// `p` (offsets [G+1], members [B], cursor [G], total [B] with CARE) must be device memory.
template <typename T>
cudaError_t launch_group_advantages(const Params<T>& p, cudaStream_t stream);

}  // namespace fastgrpo::group_adv::cuda
