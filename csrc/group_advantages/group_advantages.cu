// fastgrpo::group_advantages on CUDA: one launch, one block. Plain CUDA C++ (nvcc compiles it alone).
//
// Phases, separated by __syncthreads():
//   1. group sizes (integer atomics: deterministic) and their exclusive scan -> CSR offsets;
//   2. stable placement by warp 0: __match_any_sync ranks equal group ids within each 32-wide slice of the
//      batch, so each group's members stay in batch order and every per-group sum runs in the same order as on
//      the CPU (same bits, see group_advantages.h);
//   3. per group (a thread each): GRPO-CARE bonus, then statistics and centred rewards;
//   4. batch std (fp64 block reductions) when the scale needs it, and the division;
//   5. COPO: global rewards per group, their shifted statistics (thread 0, in group order), global advantages
//      and blend weights.
// Index values outside [0, G) are skipped (the CPU op raises; fastgrpo.advantages.group_index never makes them).

#include <cuda_runtime.h>

#include <cstdint>

#include "group_advantages.h"
#include "group_advantages_cuda.h"

namespace fastgrpo::group_adv::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kSmemCursor = 4096;  // groups whose placement cursor lives in shared memory

__device__ __forceinline__ double block_sum(double v, double* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < kWarps; ++w) s += red[w];  // every thread, same order: same value everywhere
  return s;
}

// Exclusive scan of cnt[0..G) into off[0..G] (off[0] = 0), block-wide.
__device__ void exclusive_scan(const int32_t* cnt, int32_t* off, int64_t G, int32_t* part) {
  const int64_t per = (G + kThreads - 1) / kThreads;
  const int64_t lo = threadIdx.x * per, hi = lo + per < G ? lo + per : G;
  int32_t local = 0;
  for (int64_t g = lo; g < hi; ++g) local += cnt[g];
  part[threadIdx.x] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t run = 0;
    for (int t = 0; t < kThreads; ++t) {
      const int32_t c = part[t];
      part[t] = run;
      run += c;
    }
    off[G] = run;
  }
  __syncthreads();
  int32_t run = part[threadIdx.x];
  for (int64_t g = lo; g < hi; ++g) {
    const int32_t c = cnt[g];
    off[g] = run;
    run += c;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) group_advantages_kernel(Params<T> p) {
  __shared__ int32_t part[kThreads];
  __shared__ int32_t scur[kSmemCursor];
  __shared__ double red[kWarps];
  __shared__ T copo_stats[2];

  const int tid = threadIdx.x;
  const int64_t B = p.B, G = p.G;
  int32_t* cursor = G <= kSmemCursor ? scur : p.cursor;

  // 1. sizes -> offsets
  for (int64_t g = tid; g < G; g += kThreads) cursor[g] = 0;
  __syncthreads();
  for (int64_t i = tid; i < B; i += kThreads) {
    const int64_t g = p.index[i];
    if (g >= 0 && g < G) atomicAdd(&cursor[g], 1);
  }
  __syncthreads();
  exclusive_scan(cursor, p.offsets, G, part);
  __syncthreads();
  for (int64_t g = tid; g < G; g += kThreads) cursor[g] = p.offsets[g];
  __syncthreads();

  // 2. stable placement (warp 0)
  if (tid < 32) {
    const int lane = tid;
    for (int64_t base = 0; base < B; base += 32) {
      const int64_t i = base + lane;
      int64_t g = i < B ? p.index[i] : -1;
      if (g >= G) g = -1;
      const int gk = static_cast<int>(g);
      const unsigned same = __match_any_sync(kFull, gk);
      const int rank = __popc(same & ((1u << lane) - 1u));
      const int leader = __ffs(same) - 1;
      int32_t pos = 0;
      if (lane == leader && gk >= 0) {
        pos = cursor[gk];
        cursor[gk] = pos + __popc(same);
      }
      pos = __shfl_sync(kFull, pos, leader);
      if (gk >= 0) p.members[pos + rank] = static_cast<int32_t>(i);
      __syncwarp();
    }
  }
  __syncthreads();

  // 3. per group: CARE bonus, statistics, centred rewards
  const T* r = p.rewards;
  if (p.acc != nullptr) {
    for (int64_t g = tid; g < G; g += kThreads) {
      care_group(p, p.members + p.offsets[g], p.offsets[g + 1] - p.offsets[g]);
    }
    __syncthreads();
    r = p.total;
  }
  for (int64_t g = tid; g < G; g += kThreads) {
    centre_group(p, r, g, p.members + p.offsets[g], p.offsets[g + 1] - p.offsets[g]);
  }
  __syncthreads();

  // 4. division
  const Divisor div = divisor_of(p);
  if (div == Divisor::kGroupStd) {
    for (int64_t i = tid; i < B; i += kThreads) {
      const int64_t g = p.index[i];
      if (g >= 0 && g < G) p.advantages[i] = p.advantages[i] / (p.std[g] + p.eps);
    }
  } else if (div == Divisor::kBatchStdRewards || div == Divisor::kBatchStdCentred) {
    const T* x = div == Divisor::kBatchStdRewards ? r : p.advantages;
    double s = 0.0;
    for (int64_t i = tid; i < B; i += kThreads) s += static_cast<double>(x[i]);
    const double m = block_sum(s, red) / static_cast<double>(B);
    double d2 = 0.0;
    for (int64_t i = tid; i < B; i += kThreads) {
      const double d = static_cast<double>(x[i]) - m;
      d2 += d * d;
    }
    d2 = block_sum(d2, red);
    const T denom = static_cast<T>(batch_std_from_sums(d2, B)) + p.eps;
    __syncthreads();  // x may alias advantages: every read above is done
    for (int64_t i = tid; i < B; i += kThreads) p.advantages[i] = p.advantages[i] / denom;
  }

  // 5. COPO
  if (p.entropy != nullptr) {
    for (int64_t g = tid; g < G; g += kThreads) {
      p.global_adv[g] = copo_global_reward(p, g, p.offsets[g + 1] - p.offsets[g]);
    }
    __syncthreads();
    if (tid == 0) {
      const Stats<T> st = shifted_stats(p.global_adv, static_cast<int32_t>(G), [](int32_t j) { return j; });
      copo_stats[0] = st.mean;
      copo_stats[1] = st.std;
    }
    __syncthreads();
    for (int64_t g = tid; g < G; g += kThreads) {
      p.global_adv[g] = (p.global_adv[g] - copo_stats[0]) / (copo_stats[1] + p.copo_eps);
      p.blend[g] = sigmoid(mul_rn(p.copo_k, p.entropy[g] - p.copo_b));
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_group_advantages(const Params<T>& p, cudaStream_t stream) {
  group_advantages_kernel<T><<<1, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_group_advantages<float>(const Params<float>&, cudaStream_t);
template cudaError_t launch_group_advantages<double>(const Params<double>&, cudaStream_t);

}  // namespace fastgrpo::group_adv::cuda
