// Baseline build of the CPU epilogue kernels: runs on any CPU torch runs on (the generic at::vec path,
// auto-vectorised by the compiler for the baseline instruction set).
#define FASTGRPO_ISA_NS cpu_default
#include "epilogue_cpu_kernel.h"
