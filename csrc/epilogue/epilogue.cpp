// ATen glue of the epilogue ops on CPU: argument checks, ISA dispatch, at::parallel_for over rows.
// The math is in epilogue_cpu_kernel.h; schemas in ../bindings.cpp.

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>

#include "../common.h"
#include "../ops.h"
#include "epilogue.h"
#include "epilogue_checks.h"

namespace fastgrpo {

namespace {

enum class Isa : int { kAuto = -1, kDefault = 0, kAvx2 = 1 };
std::atomic<int> g_requested{static_cast<int>(Isa::kAuto)};

bool cpu_can_run_avx2() {
#if defined(FASTGRPO_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool aten_allows_avx2() {
  // honours ATEN_CPU_CAPABILITY=default, so the whole process runs baseline kernels when asked to
  const std::string cap = at::get_cpu_capability();
  return cap == "AVX2" || cap == "AVX512";
}

Isa selected_isa() {
  const auto req = static_cast<Isa>(g_requested.load(std::memory_order_relaxed));
  if (req != Isa::kAuto) return req;
  static const Isa automatic = (cpu_can_run_avx2() && aten_allows_avx2()) ? Isa::kAvx2 : Isa::kDefault;
  return automatic;
}

epilogue::FwdRowsFn fwd_fn() {
#if defined(FASTGRPO_HAVE_AVX2)
  if (selected_isa() == Isa::kAvx2) return &epilogue::cpu_avx2::lse_logp_entropy_rows;
#endif
  return &epilogue::cpu_default::lse_logp_entropy_rows;
}

epilogue::BwdRowsFn bwd_fn() {
#if defined(FASTGRPO_HAVE_AVX2)
  if (selected_isa() == Isa::kAvx2) return &epilogue::cpu_avx2::logits_grad_rows;
#endif
  return &epilogue::cpu_default::logits_grad_rows;
}

// Rows per parallel task: at least ~64K elements each, so small blocks are not split across threads.
int64_t grain_rows(int64_t V) {
  constexpr int64_t kMinElemsPerTask = 1 << 16;
  return std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(V, 1));
}

void check_targets_in_range(const char* op, const at::Tensor& targets, int64_t V) {
  const int64_t* t = targets.data_ptr<int64_t>();
  const int64_t n = targets.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(t[i] >= 0 && t[i] < V, op, ": targets[", i, "] = ", t[i],
                " is outside [0, V) for a logits block with V = ", V,
                " (the engine replaces ignored targets by 0 before calling the epilogue)");
  }
}

}  // namespace

Tensor3 lse_logp_entropy_cpu(const at::Tensor& z, const at::Tensor& targets, double inv_temp) {
  constexpr const char* op = "fastgrpo::lse_logp_entropy";
  epilogue::check_fwd_args(op, z, targets, inv_temp);
  const epilogue::FwdCall call = epilogue::fwd_call(z, targets, inv_temp);
  const int64_t C = z.size(0), V = z.size(1);
  check_targets_in_range(op, call.targets, V);
  if (C > 0) {
    const auto fn = fwd_fn();
    at::parallel_for(0, C, grain_rows(V), [&](int64_t begin, int64_t end) { fn(call.args, begin, end); });
  }
  return {call.lse, call.logp, call.entropy};
}

void logits_grad_cpu(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse,
                     const at::Tensor& entropy, const at::Tensor& c_logp, const std::optional<at::Tensor>& c_ent,
                     double inv_temp) {
  constexpr const char* op = "fastgrpo::logits_grad_";
  epilogue::check_bwd_args(op, z, targets, lse, entropy, c_logp, c_ent, inv_temp);
  const epilogue::BwdCall call = epilogue::bwd_call(z, targets, lse, entropy, c_logp, c_ent, inv_temp);
  const int64_t C = z.size(0), V = z.size(1);
  check_targets_in_range(op, call.targets, V);
  if (C == 0) return;
  const auto fn = bwd_fn();
  at::parallel_for(0, C, grain_rows(V), [&](int64_t begin, int64_t end) { fn(call.args, begin, end); });
}

std::string cpu_kernel() {
  return selected_isa() == Isa::kAvx2 ? "avx2" : "default";
}

void set_cpu_kernel(const std::string& name) {
  if (name == "auto") {
    g_requested.store(static_cast<int>(Isa::kAuto));
  } else if (name == "default") {
    g_requested.store(static_cast<int>(Isa::kDefault));
  } else if (name == "avx2") {
    TORCH_CHECK(avx2_kernels_built(), "set_cpu_kernel('avx2'): fastgrpo._C was built without the AVX2 kernels "
                "(the build machine lacked AVX2/FMA/F16C or the compiler is not GCC/Clang on x86-64)");
    TORCH_CHECK(cpu_can_run_avx2(), "set_cpu_kernel('avx2'): this CPU lacks AVX2, FMA or F16C");
    g_requested.store(static_cast<int>(Isa::kAvx2));
  } else {
    TORCH_CHECK(false, "set_cpu_kernel: name must be 'auto', 'avx2' or 'default', got '", name, "'");
  }
}

bool avx2_kernels_built() {
#if defined(FASTGRPO_HAVE_AVX2)
  return true;
#else
  return false;
#endif
}

}  // namespace fastgrpo
