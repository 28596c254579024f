// CUDA kernels of the epilogue ops: plain CUDA C++ (no torch header), so `nvcc -c epilogue.cu` builds them alone.
//
// Layout: one row of the [C, V] block per "row group" of kRowThreads threads: a warp for V <= 2048 (8 rows per
// 256-thread block), a whole 256- or 512-thread block above. Every thread walks its row in 16-byte packs
// (4 fp32 or 8 bf16/fp16; a scalar head up to the first 16-byte boundary and a scalar tail), so rows whose
// V is not a multiple of the pack still get vector loads for all but < 8 elements at each end.
//
// Forward reads the block once: each thread keeps an online (m, s, t) with s = sum e^(x - m) and
// t = sum e^(x - m) (x - m), rescaled when m grows (once per pack, not per element); states are merged with warp
// shuffles, then across warps through shared memory. lse = m + log s, entropy = log s - t / s and
// logp = (x_y - m) - log s use shifted quantities only (stable at |x| ~ 1e4). A NaN anywhere in the row makes
// all three outputs NaN (fmaxf alone would drop it). Targets outside [0, V) give logp = NaN (no host sync to
// raise; the CPU op raises).
//
// Gradient reads the row twice (the first read recomputes its max and log-partition, see logits_grad_kernel)
// and writes it once, in place, same layout; the one-hot term is added by the thread that owns element y, so
// no second write races with the sweep. Every thread must finish reading before any writes: the row groups'
// reductions (shuffles / __syncthreads) order the two sweeps.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <cstring>

#include "epilogue.h"

namespace fastgrpo::epilogue::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float neg_inf() {
  return __int_as_float(0xff800000);
}

template <typename T>
struct Pack {
  static constexpr int N = 16 / sizeof(T);  // elements per 16-byte load
};

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// 16-byte load of N elements, converted to fp32 in registers.
template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float (&x)[Pack<T>::N]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) x[k] = __uint_as_float(w[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      T lo, hi;
      const uint16_t bl = static_cast<uint16_t>(w[k] & 0xffffu), bh = static_cast<uint16_t>(w[k] >> 16);
      memcpy(&lo, &bl, 2);
      memcpy(&hi, &bh, 2);
      x[2 * k] = to_float(lo);
      x[2 * k + 1] = to_float(hi);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&x)[Pack<T>::N]) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = __float_as_uint(x[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const T lo = from_float<T>(x[2 * k]), hi = from_float<T>(x[2 * k + 1]);
      uint16_t bl, bh;
      memcpy(&bl, &lo, 2);
      memcpy(&bh, &hi, 2);
      w[k] = static_cast<uint32_t>(bl) | (static_cast<uint32_t>(bh) << 16);
    }
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Online softmax statistics of the values seen so far (shifted by m).
struct Acc {
  float m;  // running max of x
  float s;  // sum e^(x - m)
  float t;  // sum e^(x - m) (x - m)
};

__device__ __forceinline__ Acc acc_empty() {
  return {neg_inf(), 0.f, 0.f};
}

// Rebase (s, t) from max m to max M >= m: e^(x - M) = e^(x - m) e^(m - M), (x - M) = (x - m) + (m - M).
__device__ __forceinline__ void acc_rebase(float m, float s, float t, float M, float& s_out, float& t_out) {
  if (s > 0.f) {
    const float d = m - M;
    const float a = expf(d);
    s_out = s * a;
    t_out = a * fmaf(d, s, t);
  } else {
    s_out = 0.f;
    t_out = 0.f;
  }
}

__device__ __forceinline__ Acc acc_merge(const Acc& a, const Acc& b) {
  const float M = fmaxf(a.m, b.m);
  float sa, ta, sb, tb;
  acc_rebase(a.m, a.s, a.t, M, sa, ta);
  acc_rebase(b.m, b.s, b.t, M, sb, tb);
  return {M, sa + sb, ta + tb};
}

// Add n values x (already scaled by inv_temp): one rescale at most, then one exp per value.
// u is clamped at -FLT_MAX so that a -inf logit adds exactly 0 to t (never 0 * -inf).
template <int n>
__device__ __forceinline__ void acc_add(Acc& st, bool& nan, const float (&x)[n]) {
  float bm = x[0];
#pragma unroll
  for (int k = 1; k < n; ++k) bm = fmaxf(bm, x[k]);
#pragma unroll
  for (int k = 0; k < n; ++k) nan |= (x[k] != x[k]);
  if (bm > st.m) {
    acc_rebase(st.m, st.s, st.t, bm, st.s, st.t);
    st.m = bm;
  }
#pragma unroll
  for (int k = 0; k < n; ++k) {
    const float u = fmaxf(x[k] - st.m, -FLT_MAX);
    const float e = expf(u);
    st.s += e;
    st.t = fmaf(e, u, st.t);
  }
}

__device__ __forceinline__ Acc warp_reduce(Acc a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const Acc b{__shfl_xor_sync(kFullMask, a.m, off), __shfl_xor_sync(kFullMask, a.s, off),
                __shfl_xor_sync(kFullMask, a.t, off)};
    a = acc_merge(a, b);
  }
  return a;
}

// Number of 16-byte-unaligned leading elements of a row (its pointer is aligned to sizeof(T)).
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* row, int64_t V) {
  const int64_t bytes = static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15);
  const int64_t h = bytes / static_cast<int64_t>(sizeof(T));
  return h < V ? h : V;
}

// Online (m, s, t) of one row, reduced over its kRowThreads threads and returned to every one of them; `nan`
// becomes true on all of them when the row holds a NaN.
template <typename T, int kRowThreads, int kBlock>
__device__ __forceinline__ Acc row_stats(const T* zr, int64_t V, float inv_temp, int lane, bool& nan) {
  constexpr int N = Pack<T>::N;
  const int64_t head = head_len(zr, V);
  const int64_t npack = (V - head) / N;
  const T* body = zr + head;

  Acc st = acc_empty();
  nan = false;
  for (int64_t v = lane; v < head; v += kRowThreads) {
    const float x[1] = {to_float(zr[v]) * inv_temp};
    acc_add<1>(st, nan, x);
  }
  for (int64_t k = lane; k < npack; k += kRowThreads) {
    float x[N];
    load_pack<T>(body + k * N, x);
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] *= inv_temp;
    acc_add<N>(st, nan, x);
  }
  for (int64_t v = head + npack * N + lane; v < V; v += kRowThreads) {
    const float x[1] = {to_float(zr[v]) * inv_temp};
    acc_add<1>(st, nan, x);
  }

  st = warp_reduce(st);  // xor butterfly: every lane of the warp holds the warp's total
  if constexpr (kRowThreads == 32) {
    nan = __any_sync(kFullMask, nan);
  } else {
    __shared__ Acc part[kBlock / 32];
    __shared__ Acc total;
    const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
    if (wl == 0) part[warp] = st;
    nan = __syncthreads_or(nan);
    if (warp == 0) {
      st = wl < kBlock / 32 ? part[wl] : acc_empty();
      st = warp_reduce(st);
      if (wl == 0) total = st;
    }
    __syncthreads();
    st = total;
  }
  return st;
}

// kRowThreads threads per row (32: a warp; == kBlock: the whole block), kBlock / kRowThreads rows per block.
template <typename T, int kRowThreads, int kBlock>
__global__ void __launch_bounds__(kBlock)
    lse_logp_entropy_kernel(const T* __restrict__ z, const int64_t* __restrict__ targets, int64_t C, int64_t V,
                            float inv_temp, float* __restrict__ lse, float* __restrict__ logp,
                            float* __restrict__ entropy) {
  static_assert(kRowThreads == 32 || kRowThreads == kBlock, "a row is a warp or a block");
  constexpr int kRowsPerBlock = kBlock / kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  const int lane = threadIdx.x % kRowThreads;
  if (row >= C) return;  // uniform per row group

  const T* zr = z + row * V;
  bool nan;
  const Acc st = row_stats<T, kRowThreads, kBlock>(zr, V, inv_temp, lane, nan);
  if (lane != 0) return;

  const int64_t y = targets[row];
  const float ls = logf(st.s);
  const float qnan = __int_as_float(0x7fffffff);
  const bool bad_y = y < 0 || y >= V;
  const float xy = bad_y ? qnan : to_float(zr[y]) * inv_temp;
  lse[row] = nan ? qnan : st.m + ls;
  entropy[row] = nan ? qnan : ls - st.t / st.s;
  logp[row] = nan ? qnan : (xy - st.m) - ls;
}

template <typename T, int kRowThreads, int kBlock, bool kHasEnt>
__global__ void __launch_bounds__(kBlock)
    logits_grad_kernel(T* __restrict__ z, const int64_t* __restrict__ targets, const float* __restrict__ lse,
                       const float* __restrict__ entropy, const float* __restrict__ c_logp,
                       const float* __restrict__ c_ent, int64_t C, int64_t V, float inv_temp) {
  static_assert(kRowThreads == 32 || kRowThreads == kBlock, "a row is a warp or a block");
  constexpr int N = Pack<T>::N;
  constexpr int kRowsPerBlock = kBlock / kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  const int lane = threadIdx.x % kRowThreads;
  if (row >= C) return;

  // The row's shifted log-partition is recomputed (one more read of the row) instead of using the stored fp32
  // lse: near |x| ~ 1e4 its rounding alone (~5e-4) would scale every p by that relative error. All differences
  // are taken against m, so no two numbers near 1e4 are subtracted after rounding (as in the CPU kernel).
  T* zr = z + row * V;
  bool nan;
  const Acc st = row_stats<T, kRowThreads, kBlock>(zr, V, inv_temp, lane, nan);
  const float ls = nan ? __int_as_float(0x7fffffff) : logf(st.s);
  const float exm = static_cast<float>(static_cast<double>(ls) - static_cast<double>(entropy[row]));  // E_p[x]-m
  const float cl = c_logp[row];
  const float a = -inv_temp * cl;
  const float b = kHasEnt ? -inv_temp * c_ent[row] : 0.f;
  const float onehot = inv_temp * cl;
  const int64_t y = targets[row];
  (void)lse;  // kept in the signature: the op's contract; see above for why it is not read

  // u = x - m, p = e^(u - log s), d = x - E_p[x] = u - exm; g = a p + b p d (+ inv_temp c_logp at y);
  // u is clamped at -FLT_MAX so that p d is 0 for a -inf logit
  auto grad = [&](float zv, int64_t v) {
    const float u = fmaxf(fmaf(zv, inv_temp, -st.m), -FLT_MAX);
    const float p = expf(u - ls);
    float g;
    if constexpr (kHasEnt) {
      g = fmaf(b, p * (u - exm), p * a);
    } else {
      g = p * a;
    }
    return v == y ? g + onehot : g;
  };

  const int64_t head = head_len(zr, V);
  const int64_t npack = (V - head) / N;
  for (int64_t v = lane; v < head; v += kRowThreads) zr[v] = from_float<T>(grad(to_float(zr[v]), v));
  for (int64_t k = lane; k < npack; k += kRowThreads) {
    const int64_t v0 = head + k * N;
    float x[N];
    load_pack<T>(zr + v0, x);
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = grad(x[j], v0 + j);
    store_pack<T>(zr + v0, x);
  }
  for (int64_t v = head + npack * N + lane; v < V; v += kRowThreads) zr[v] = from_float<T>(grad(to_float(zr[v]), v));
}

}  // namespace fastgrpo::epilogue::cuda
