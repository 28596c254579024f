// Plain C++ declarations shared by the CPU kernels, the CUDA launchers and the ATen glue of the epilogue ops.
// No torch or CUDA header here: nvcc and the per-ISA CPU translation units include it on their own.
#pragma once

#include <cstdint>

namespace fastgrpo::epilogue {

// dtype of the logits block Z (the ops accept no other)
enum class ZType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// lse_logp_entropy on rows [begin, end) of a contiguous [C, V] block.
struct FwdArgs {
  const void* z;           // [C, V] row-major, dtype `dtype`
  ZType dtype;
  const int64_t* targets;  // [C], each in [0, V)
  int64_t V;
  float inv_temp;          // > 0; x = z * inv_temp
  float* lse;              // [C] out
  float* logp;             // [C] out
  float* entropy;          // [C] out
};

// logits_grad_ on rows [begin, end): Z[i, :] <- dL/dZ[i, :] (in place, Z's dtype).
struct BwdArgs {
  void* z;                 // [C, V] row-major, overwritten
  ZType dtype;
  const int64_t* targets;  // [C]
  const float* lse;        // [C]
  const float* entropy;    // [C]
  const float* c_logp;     // [C] dL/dlogp
  const float* c_ent;      // [C] dL/dentropy, or nullptr for 0
  int64_t V;
  float inv_temp;
};

using FwdRowsFn = void (*)(const FwdArgs&, int64_t begin, int64_t end);
using BwdRowsFn = void (*)(const BwdArgs&, int64_t begin, int64_t end);

// One set per instruction set; epilogue_cpu_kernel.h defines them.
namespace cpu_default {
void lse_logp_entropy_rows(const FwdArgs& args, int64_t begin, int64_t end);
void logits_grad_rows(const BwdArgs& args, int64_t begin, int64_t end);
}  // namespace cpu_default
namespace cpu_avx2 {  // only linked in when setup.py built the AVX2 library (FASTGRPO_HAVE_AVX2)
void lse_logp_entropy_rows(const FwdArgs& args, int64_t begin, int64_t end);
void logits_grad_rows(const BwdArgs& args, int64_t begin, int64_t end);
}  // namespace cpu_avx2

}  // namespace fastgrpo::epilogue
