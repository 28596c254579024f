// Argument checks and output allocation of fastgrpo::group_advantages, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../common.h"
#include "group_advantages.h"

namespace fastgrpo::group_adv {

constexpr const char* kOp = "fastgrpo::group_advantages";

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline Estimator parse_estimator(const std::string& s) {
  if (s == "grpo") return Estimator::kGrpo;
  if (s == "rloo") return Estimator::kRloo;
  if (s == "reinforce_pp") return Estimator::kReinforcePP;
  TORCH_CHECK(false, kOp, ": estimator must be 'grpo', 'rloo' or 'reinforce_pp', got '", s, "'");
  return Estimator::kGrpo;
}

inline Scale parse_scale(const std::string& s) {
  if (s == "group") return Scale::kGroup;
  if (s == "batch") return Scale::kBatch;
  if (s == "none") return Scale::kNone;
  TORCH_CHECK(false, kOp, ": scale must be 'group', 'batch' or 'none', got '", s, "'");
  return Scale::kGroup;
}

inline void check_finite_scalar(const char* name, double v) {
  TORCH_CHECK(std::isfinite(v), kOp, ": ", name, " must be finite, got ", v);
}

inline void check_like(const char* name, const at::Tensor& t, int64_t n, const char* n_name, const at::Tensor& rewards) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, kOp, ": ", name, " must have shape [", n_name, "] = [", n, "], got ",
              shape_of(t));
  TORCH_CHECK(t.scalar_type() == rewards.scalar_type(), kOp, ": ", name, " must have the dtype of rewards (",
              rewards.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == rewards.device(), kOp, ": ", name, " is on ", t.device(), " but rewards is on ",
              rewards.device());
}

struct Checked {
  at::Tensor rewards, index, acc, confidence, entropy;  // contiguous
  int64_t B, G;
  Estimator estimator;
  Scale scale;
};

inline Checked check_args(const at::Tensor& rewards, const at::Tensor& index, int64_t num_groups,
                          const std::string& estimator, const std::string& scale, double eps,
                          const std::optional<at::Tensor>& care_acc, const std::optional<at::Tensor>& care_confidence,
                          double care_coefficient, double care_margin, double care_acc_threshold,
                          const std::optional<at::Tensor>& copo_entropy, double copo_k, double copo_b,
                          double copo_eps) {
  TORCH_CHECK(rewards.dim() == 1 && rewards.size(0) >= 1, kOp, ": rewards must be a non-empty 1-D [B] tensor, got ",
              shape_of(rewards));
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble, kOp,
              ": rewards must be float32 or float64 (the Python wrapper converts other dtypes), got ",
              rewards.scalar_type());
  const int64_t B = rewards.size(0);
  TORCH_CHECK(B < std::numeric_limits<int32_t>::max(), kOp, ": at most 2^31 - 2 rewards, got ", B);
  TORCH_CHECK(index.dim() == 1 && index.size(0) == B, kOp, ": index must have shape [B] = [", B, "] like rewards, got ",
              shape_of(index));
  TORCH_CHECK(index.scalar_type() == at::kLong, kOp, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.device() == rewards.device(), kOp, ": index is on ", index.device(), " but rewards is on ",
              rewards.device());
  TORCH_CHECK(num_groups >= 1 && num_groups <= B, kOp, ": num_groups must be in [1, B] = [1, ", B, "], got ",
              num_groups);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, kOp, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(care_acc.has_value() == care_confidence.has_value(), kOp,
              ": give both care_acc and care_confidence (GRPO-CARE) or neither");
  check_finite_scalar("care_coefficient", care_coefficient);
  check_finite_scalar("care_margin", care_margin);
  check_finite_scalar("care_acc_threshold", care_acc_threshold);
  check_finite_scalar("copo_k", copo_k);
  check_finite_scalar("copo_b", copo_b);
  TORCH_CHECK(std::isfinite(copo_eps) && copo_eps >= 0, kOp, ": copo_eps must be finite and >= 0, got ", copo_eps);

  Checked c{rewards.contiguous(), index.contiguous(), {}, {}, {}, B, num_groups, parse_estimator(estimator),
            parse_scale(scale)};
  if (care_acc.has_value()) {
    check_like("care_acc", *care_acc, B, "B", rewards);
    check_like("care_confidence", *care_confidence, B, "B", rewards);
    c.acc = care_acc->contiguous();
    c.confidence = care_confidence->contiguous();
  }
  if (copo_entropy.has_value()) {
    check_like("copo_entropy", *copo_entropy, num_groups, "num_groups", rewards);
    c.entropy = copo_entropy->contiguous();
  }
  return c;
}

// Outputs: advantages [B], bonus [B] (or [0] without CARE), mean [G], std [G], global / blend [G] (or [0]).
inline Outputs allocate_outputs(const Checked& c) {
  const at::Tensor& r = c.rewards;
  const int64_t nb = c.acc.defined() ? c.B : 0;
  const int64_t ng = c.entropy.defined() ? c.G : 0;
  return {r.new_empty({c.B}), r.new_empty({nb}), r.new_empty({c.G}),
          r.new_empty({c.G}), r.new_empty({ng}), r.new_empty({ng})};
}

template <typename T>
Params<T> make_params(const Checked& c, const Outputs& out, double eps, double care_coefficient, double care_margin,
                      double care_acc_threshold, double copo_k, double copo_b, double copo_eps,
                      bool copo_entropy_coef) {
  Params<T> p;
  p.B = c.B;
  p.G = c.G;
  p.rewards = c.rewards.data_ptr<T>();
  p.index = c.index.data_ptr<int64_t>();
  p.estimator = c.estimator;
  p.scale = c.scale;
  p.eps = static_cast<T>(eps);
  if (c.acc.defined()) {
    p.acc = c.acc.data_ptr<T>();
    p.confidence = c.confidence.data_ptr<T>();
    p.bonus = std::get<1>(out).data_ptr<T>();
  }
  p.care_coefficient = static_cast<T>(care_coefficient);
  p.care_margin = static_cast<T>(care_margin);
  p.care_acc_threshold = static_cast<T>(care_acc_threshold);
  if (c.entropy.defined()) {
    p.entropy = c.entropy.data_ptr<T>();
    p.global_adv = std::get<4>(out).data_ptr<T>();
    p.blend = std::get<5>(out).data_ptr<T>();
  }
  p.copo_k = static_cast<T>(copo_k);
  p.copo_b = static_cast<T>(copo_b);
  p.copo_eps = static_cast<T>(copo_eps);
  p.copo_entropy_coef = copo_entropy_coef;
  p.advantages = std::get<0>(out).data_ptr<T>();
  p.mean = std::get<2>(out).data_ptr<T>();
  p.std = std::get<3>(out).data_ptr<T>();
  return p;
}

}  // namespace fastgrpo::group_adv
