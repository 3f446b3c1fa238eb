// The GPU build of the standard/mini kernels: their source, shared with the emulator, is
// shard_kernels.cuh.
#define MISS_CUDA_NAMESPACE cuda
#include "shard_kernels.cuh"
#include "bat_kernels.cuh"
#include "bat_grad_kernels.cuh"
#include "bat_inverse_kernels.cuh"
