// fastgrpo._C: the op schemas (TORCH_LIBRARY) and a small Python module with build information.
// The CPU / CUDA implementations (declared in ops.h, defined in the op folders) are registered here too, so
// only this file pays for torch/library.h; fake (meta) implementations for torch.compile are registered in Python, fastgrpo/ops/_cpp.py.
//
// Loading this module registers the ops as torch.ops.fastgrpo.*; only fastgrpo._backends.load_ext imports it.

#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common.h"
#include "ops.h"

TORCH_LIBRARY(fastgrpo, m) {
  // the fake (meta) kernels live in this Python module; torch asks for it when it needs them
  m.set_python_module("fastgrpo.ops._cpp");
  // Epilogue forward on a [C, V] logits block (fp32/bf16/fp16, contiguous), x = z * inv_temp:
  // lse = logsumexp(x), logp = x[y] - lse, entropy = lse - sum softmax(x) x; fp32 [C] each.
  m.def("lse_logp_entropy(Tensor z, Tensor targets, float inv_temp) -> (Tensor lse, Tensor logp, Tensor entropy)");
  // Epilogue gradient, in place: z <- inv_temp * (c_logp (onehot(y) - p) - c_ent p (x - Ex)).
  m.def(
      "logits_grad_(Tensor(a!) z, Tensor targets, Tensor lse, Tensor entropy, Tensor c_logp, Tensor? c_ent, "
      "float inv_temp) -> ()");
  // Group-relative advantages with the GRPO-CARE bonus and COPO's global advantage / blend weight in one call;
  // see csrc/group_advantages/group_advantages.h for the math and fastgrpo/advantages.py for the spec.
  m.def(
      "group_advantages(Tensor rewards, Tensor index, int num_groups, str estimator, str scale, float eps, "
      "Tensor? care_acc, Tensor? care_confidence, float care_coefficient, float care_margin, "
      "float care_acc_threshold, Tensor? copo_entropy, float copo_k, float copo_b, float copo_eps, "
      "bool copo_entropy_coef) -> (Tensor advantages, Tensor bonus, Tensor mean, Tensor std, "
      "Tensor global_advantages, Tensor blend_weight)");
}

TORCH_LIBRARY_IMPL(fastgrpo, CPU, m) {
  m.impl("lse_logp_entropy", &fastgrpo::lse_logp_entropy_cpu);
  m.impl("logits_grad_", &fastgrpo::logits_grad_cpu);
  m.impl("group_advantages", &fastgrpo::group_advantages_cpu);
}

#if defined(FASTGRPO_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastgrpo, CUDA, m) {
  m.impl("lse_logp_entropy", &fastgrpo::lse_logp_entropy_cuda);
  m.impl("logits_grad_", &fastgrpo::logits_grad_cuda);
  m.impl("group_advantages", &fastgrpo::group_advantages_cuda);
}
#endif

namespace fastgrpo {
bool cuda_kernels_built() {
#if defined(FASTGRPO_WITH_CUDA)
  return true;
#else
  return false;
#endif
}
}  // namespace fastgrpo

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  const std::string kernel = fastgrpo::cpu_kernel();
  return Py_BuildValue("{s:O,s:O,s:s}", "cuda", fastgrpo::cuda_kernels_built() ? Py_True : Py_False, "avx2_built",
                       fastgrpo::avx2_kernels_built() ? Py_True : Py_False, "cpu_kernel", kernel.c_str());
}

PyObject* set_cpu_kernel(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    fastgrpo::set_cpu_kernel(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS,
     "dict: cuda (CUDA kernels compiled in), avx2_built (AVX2 CPU kernels compiled in), cpu_kernel (in use)"},
    {"set_cpu_kernel", set_cpu_kernel, METH_O,
     "select the CPU epilogue kernels: 'auto' (default), 'avx2' or 'default' (for tests and benchmarks)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "fastgrpo C++/CUDA ops (registered as torch.ops.fastgrpo)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  return PyModule_Create(&kModule);
}
