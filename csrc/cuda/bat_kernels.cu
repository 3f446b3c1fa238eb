// The GPU build of the BAT kernels: their source, shared with the emulator, is bat_kernels.cuh.
#define MISS_CUDA_NAMESPACE cuda
#include "bat_kernels.cuh"
