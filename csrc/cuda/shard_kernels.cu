// The GPU build of every kernel: their source, shared with the emulator, is csrc/cuda/*.cuh.
#define MISS_CUDA_NAMESPACE cuda
#include "shard_kernels.cuh"
#include "merge_kernels.cuh"
#include "bat_kernels.cuh"
#include "bat_grad_kernels.cuh"
#include "bat_inverse_kernels.cuh"
