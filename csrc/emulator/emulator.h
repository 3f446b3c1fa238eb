// An emulator of the CUDA execution model, for running this project's CUDA kernels on the
// CPU in CI (no GPU has been lent to the project). The kernel source is the one nvcc
// compiles (csrc/cuda/*.cuh); csrc/cuda/device_api.cuh maps its thread indices, barriers,
// shared memory, atomics and pointers onto this file when the host compiler builds it.
//
// What it does:
// - runs a launch's grid block by block (in a seeded random order), the threads of a block
//   as fibers that really interleave: the scheduler picks a random runnable thread, which
//   runs until a barrier, its end, or a random preemption at a memory access;
// - checks every global and shared memory access of the kernel: against the extents of the
//   buffers the launch passed (out of bounds), against writes never made (a read of an output
//   element or shared slot that nothing wrote), and against the accesses of other threads: two
//   threads touching one element, at least one writing, with no barrier between them (threads
//   of different blocks are never ordered within a launch) and not both atomically, is a race.
// The first problem is reported, after the launch, as an error that names the kernel, the
// buffer and element, and the two threads.
//
// What it cannot see: warp-level timing and scheduling (threads interleave at arbitrary
// points, not in warps of 32), the memory model's weaker orderings (every access here is
// sequentially consistent), bank conflicts, occupancy, and anything inside cuBLAS / ATen.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace miss {
namespace emu {

struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// The built-in variables of the emulated thread that is running.
struct ThreadContext {
  Dim3 threadIdx, blockIdx, blockDim, gridDim;
};
ThreadContext& current();

enum class Role { kInput, kOutput, kInOut };

struct Config {
  uint64_t seed = 0;          // schedules (thread order, preemptions, block order) derive from it
  bool detect_races = true;   // every access checked; off, only bounds are
  int sm_count = 4;           // what kernels read as multiProcessorCount (grid sizing)
  double preempt = 0.125;     // probability that a thread yields at a memory access
};
Config& config();

// One line per launch since the last clear: "kernel grid=(x,y,z) block=(x,y,z)" and then
// "name:role:bytes" for each buffer it was given (role in, out or inout), then "philox=N",
// "fma=N" and "mma=N" (warp-wide m16n8k16 tensor-core products) when the kernel counted any,
// and "barriers=N", the most __syncthreads one block passed (a latency-bound kernel's chain of
// dependent phases), when there were any.
std::vector<std::string>& launch_log();

// Declares a buffer the next launch may access: [base, base + bytes), elements of
// element_size bytes, of which data_bytes are the tensor's own (less than bytes for a strided
// view: a column slab spans whole rows of its tensor; the launch log reports data_bytes).
// Outputs start unwritten: reading an element before a write is an error.
void register_buffer(const void* base, size_t bytes, size_t data_bytes, size_t element_size, Role role,
                     const char* name);

// Checks (and records) one access of `bytes` at `address`. False: the access is out of
// bounds and must not be performed (the launch then fails with that error).
bool access(const void* address, size_t bytes, bool write, bool atomic);

// Checks a vector access: `address` must be aligned to `bytes`, as the hardware requires.
bool check_alignment(const void* address, size_t bytes);

// Counts one Philox4x32-10 evaluation of the running launch (the launch log reports them:
// the cost model prices the integer work of dropout by them).
void note_philox_call();

// Counts `count` float fused multiply-adds of the running launch (the launch log reports
// them as fma=N: the cost model prices a compute-bound kernel by them).
void note_fmas(uint64_t count);

// The block's shared array `name` (the same memory for every thread of the block).
void* shared_array(const char* name, size_t bytes, size_t element_size);

void sync_threads();

// One lane's share of the warp-wide mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32:
// c = A B + c for a 16x16 A and a 16x8 B in bfloat16, two to a 32-bit register, and float32 c,
// each lane holding the fragment the PTX ISA assigns it ("Matrix Fragments for mma.m16n8k16
// with floating point type"). All 32 lanes of the warp (32 consecutive linear thread ids)
// must call it together, as on the hardware; lanes that do not are reported as warp
// divergence. The exchange of fragments orders no memory: the race checks do not count it
// as a barrier (nor does the hardware). The launch log counts these as mma=N.
void mma_m16n8k16_bf16(const uint32_t a[4], const uint32_t b[2], float c[4]);

// Runs `body` once per thread of a grid x block launch and then raises the first problem
// found, if any. The buffers registered since the previous launch belong to this one.
void launch(const char* kernel, Dim3 grid, Dim3 block, const std::function<void()>& body);

}  // namespace emu
}  // namespace miss
