// Argument checks of the epilogue ops and the marshalling of their kernel arguments, shared by the CPU and CUDA
// glue (messages name the argument and shapes).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "../common.h"
#include "epilogue.h"

namespace fastgrpo::epilogue {

inline ZType ztype_of(const at::Tensor& z) {
  switch (z.scalar_type()) {
    case at::kFloat:
      return ZType::kFloat;
    case at::kBFloat16:
      return ZType::kBFloat16;
    case at::kHalf:
      return ZType::kHalf;
    default:
      break;
  }
  TORCH_CHECK(false, "z must be float32, bfloat16 or float16, got ", z.scalar_type());
  return ZType::kFloat;
}

inline void check_vec(const char* op, const char* name, const at::Tensor& t, int64_t C, const at::Tensor& z) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [C] = [", C,
              "] like the rows of z ", shape_of(z), ", got shape ", shape_of(t));
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == z.device(), op, ": ", name, " is on ", t.device(), " but z is on ", z.device());
}

inline void check_fwd_args(const char* op, const at::Tensor& z, const at::Tensor& targets, double inv_temp) {
  TORCH_CHECK(z.dim() == 2, op, ": z must be a 2-D [C, V] logits block, got shape ", shape_of(z));
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16 || z.scalar_type() == at::kHalf,
              op, ": z must be float32, bfloat16 or float16, got ", z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), op, ": z must be contiguous (row-major [C, V]), got strides ", c10::str(z.strides()),
              " for shape ", shape_of(z));
  TORCH_CHECK(z.size(1) >= 1, op, ": z must have at least one column (V >= 1), got shape ", shape_of(z));
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == z.size(0), op, ": targets must have shape [C] = [",
              z.size(0), "] like the rows of z ", shape_of(z), ", got shape ", shape_of(targets));
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.device() == z.device(), op, ": targets is on ", targets.device(), " but z is on ", z.device());
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0.0, op,
              ": inv_temp (1 / temperature) must be finite and > 0, got ", inv_temp);
}

inline void check_bwd_args(const char* op, const at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse,
                           const at::Tensor& entropy, const at::Tensor& c_logp,
                           const std::optional<at::Tensor>& c_ent, double inv_temp) {
  check_fwd_args(op, z, targets, inv_temp);
  const int64_t C = z.size(0);
  check_vec(op, "lse", lse, C, z);
  check_vec(op, "entropy", entropy, C, z);
  check_vec(op, "c_logp", c_logp, C, z);
  if (c_ent.has_value()) check_vec(op, "c_ent", *c_ent, C, z);
}

// The forward op's contiguous targets, its fp32 outputs [C] and the kernel arguments pointing into them. Keep it
// alive until the kernel has run (the arguments are raw pointers into these tensors).
struct FwdCall {
  at::Tensor targets, lse, logp, entropy;
  FwdArgs args;
};

inline FwdCall fwd_call(const at::Tensor& z, const at::Tensor& targets, double inv_temp) {
  const auto opts = z.options().dtype(at::kFloat);
  const int64_t C = z.size(0);
  FwdCall c{targets.contiguous(), z.new_empty({C}, opts), z.new_empty({C}, opts), z.new_empty({C}, opts), {}};
  c.args = FwdArgs{z.data_ptr(),
                   ztype_of(z),
                   c.targets.data_ptr<int64_t>(),
                   z.size(1),
                   static_cast<float>(inv_temp),
                   c.lse.data_ptr<float>(),
                   c.logp.data_ptr<float>(),
                   c.entropy.data_ptr<float>()};
  return c;
}

// The gradient op's inputs made contiguous and the kernel arguments pointing into them (same lifetime rule).
struct BwdCall {
  at::Tensor targets, lse, entropy, c_logp, c_ent;
  BwdArgs args;
};

inline BwdCall bwd_call(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse,
                        const at::Tensor& entropy, const at::Tensor& c_logp, const std::optional<at::Tensor>& c_ent,
                        double inv_temp) {
  BwdCall c{targets.contiguous(), lse.contiguous(), entropy.contiguous(), c_logp.contiguous(),
            c_ent.has_value() ? c_ent->contiguous() : at::Tensor(), {}};
  c.args = BwdArgs{z.data_ptr(),
                   ztype_of(z),
                   c.targets.data_ptr<int64_t>(),
                   c.lse.data_ptr<float>(),
                   c.entropy.data_ptr<float>(),
                   c.c_logp.data_ptr<float>(),
                   c.c_ent.defined() ? c.c_ent.data_ptr<float>() : nullptr,
                   z.size(1),
                   static_cast<float>(inv_temp)};
  return c;
}

}  // namespace fastgrpo::epilogue
