// The CUDA kernels and launchers of csrc/cuda/*.cuh, compiled by the host compiler into
// miss::emulated_cuda: the same source as the GPU build, run under the emulator.
#define MISS_EMULATE_CUDA
#define MISS_CUDA_NAMESPACE emulated_cuda
#include "../cuda/shard_kernels.cuh"
#include "../cuda/merge_kernels.cuh"
#include "../cuda/bat_kernels.cuh"
#include "../cuda/bat_grad_kernels.cuh"
#include "../cuda/bat_inverse_kernels.cuh"
