// Helpers shared by the ATen glue of every op (not by the kernels, which stay torch-free).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <string>

namespace fastgrpo {

inline std::string shape_of(const at::Tensor& t) {
  return c10::str(t.sizes());
}

// CPU kernel selection (epilogue/epilogue.cpp): "avx2" or "default".
std::string cpu_kernel();
// "auto" (the fastest the CPU and ATen allow), "avx2" or "default"; raises when "avx2" cannot run here.
void set_cpu_kernel(const std::string& name);
bool avx2_kernels_built();
bool cuda_kernels_built();

}  // namespace fastgrpo
