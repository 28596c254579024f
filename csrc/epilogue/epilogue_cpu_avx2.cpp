// AVX2 + FMA + F16C build of the CPU epilogue kernels. setup.py compiles this file alone, with
// -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 (ATen's own flags for its AVX2 kernels),
// into a static library linked after every other object, and defines FASTGRPO_HAVE_AVX2 for the glue.
// The glue calls these functions only when the running CPU has AVX2, FMA and F16C and ATen itself runs
// AVX2 or better (ATEN_CPU_CAPABILITY=default therefore selects the baseline kernels too).
// Nothing here may run at load time: no static data, no initialisers.
#if !defined(CPU_CAPABILITY_AVX2)
#error "epilogue_cpu_avx2.cpp must be compiled with -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 -mavx2 -mfma -mf16c"
#endif
#define FASTGRPO_ISA_NS cpu_avx2
#include "epilogue_cpu_kernel.h"
