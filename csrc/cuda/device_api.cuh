// The thin layer between the CUDA kernels (csrc/cuda/*.cuh) and where they run. Under nvcc
// it is the real thing: __global__, threadIdx, __syncthreads, __shared__, atomics, raw
// pointers, <<<>>> launches on the current stream. Compiled by the host compiler with
// MISS_EMULATE_CUDA (csrc/emulator/), the same kernel source runs under the emulator of
// csrc/emulator/emulator.h: pointers become checked pointers, threads fibers, barriers the
// emulator's, shared arrays per emulated block.
//
// The kernels and their launchers are written once, in namespace MISS_CUDA_NAMESPACE:
// miss::cuda for the GPU build, miss::emulated_cuda for the emulated one.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../torch_api.h"  // Tensor, opmath_t, MISS_DISPATCH_FLOAT, the device guard

#ifdef MISS_EMULATE_CUDA
#include "../emulator/emulator.h"
#else
#include <cuda_runtime.h>
#include <torch/csrc/stable/macros.h>  // STD_CUDA_KERNEL_LAUNCH_CHECK
#endif

// Two namespaces, one per build: a library with both the GPU and the emulated kernels holds
// both versions of these inline functions (sm_count() differs), which must not be merged by
// the linker. Kernels and launchers name them as miss::device.
#ifdef MISS_EMULATE_CUDA
#define MISS_DEVICE_API_NAMESPACE emulated_device_api
#else
#define MISS_DEVICE_API_NAMESPACE gpu_device_api
#endif

namespace miss {
namespace MISS_DEVICE_API_NAMESPACE {

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

#ifndef MISS_EMULATE_CUDA  // ---------------------------------------------- the GPU ----------

#define MISS_GLOBAL __global__
// The most threads a kernel's blocks have: the compiler then keeps its registers within what
// a block of that many fits in (64 each at 1024 threads).
#define MISS_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#define MISS_DEVICE __device__ __forceinline__
#define MISS_RESTRICT __restrict__
#define MISS_SYNC_THREADS() __syncthreads()
#define MISS_SHARED_ARRAY(type, name, count) __shared__ type name[count]

template <typename T>
using gptr = T*;

template <int kVec, typename T>
MISS_DEVICE Pack<std::remove_const_t<T>, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<std::remove_const_t<T>, kVec>*>(p);
}
template <int kVec, typename T>
MISS_DEVICE void store_pack(T* p, const Pack<T, kVec>& pack) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
}
MISS_DEVICE void atomic_store(int* p, int value) { atomicExch(p, value); }
template <typename T>
MISS_DEVICE bool is_null(const T* p) { return p == nullptr; }
MISS_DEVICE void note_philox_call() {}
MISS_DEVICE void note_fmas(uint64_t) {}
MISS_DEVICE bool is_finite(double v) { return isfinite(v); }
// Two 16-bit elements p[0], p[1] as one 32-bit register (p[0] in the low half), the form
// tensor-core fragments take. p must be 4-byte aligned.
template <typename T>
MISS_DEVICE uint32_t load_bits32(const T* p) {
  static_assert(sizeof(T) == 2, "two 16-bit elements to a register");
  return *reinterpret_cast<const uint32_t*>(p);
}
// c = A B + c on tensor cores, one warp: emulator.h mma_m16n8k16_bf16 gives the fragments.
// Launchers choose kernels that use it only where has_mma() (compute capability 8.0 on).
MISS_DEVICE void mma_m16n8k16_bf16(const uint32_t (&a)[4], const uint32_t (&b)[2], float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

inline int current_device() {
  int device = 0;
  STD_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}
// A device attribute of the current device, read once per device (launches read them on
// every call). 0 marks "not read yet": both attributes used here are positive.
template <cudaDeviceAttr kAttribute>
int cached_device_attribute() {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cached[kCachedDevices] = {};
  const int device = current_device();
  int value = device < kCachedDevices ? cached[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttribute, device));
    if (device < kCachedDevices) cached[device].store(value, std::memory_order_relaxed);
  }
  return value;
}
inline int sm_count() { return cached_device_attribute<cudaDevAttrMultiProcessorCount>(); }
// Whether the current device has the bf16 mma.sync of compute capability 8.0.
inline bool has_mma() { return cached_device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8; }
// torch's current stream on the current device: our kernels are ordered with its GEMMs.
inline cudaStream_t current_stream() {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(current_device(), &stream));
  return static_cast<cudaStream_t>(stream);
}
inline dim3 grid_2d(unsigned int x, unsigned int y) { return dim3(x, y, 1); }

// The pointer a kernel gets for a tensor it reads, writes or both.
template <typename T>
const T* input(const Tensor& t, const char*) { return t.const_data_ptr<T>(); }
template <typename T>
T* output(Tensor& t, const char*) { return t.mutable_data_ptr<T>(); }
template <typename T>
T* inout(Tensor& t, const char*) { return t.mutable_data_ptr<T>(); }

#define MISS_DEVICE_GUARD(tensor) const ::miss::OptionalDeviceGuard miss_device_guard(tensor)
#define MISS_LAUNCH(kernel, grid, threads, ...)                                        \
  do {                                                                               \
    kernel<<<(grid), (threads), 0, ::miss::device::current_stream()>>>(__VA_ARGS__); \
    STD_CUDA_KERNEL_LAUNCH_CHECK();                                                  \
  } while (0)

#else  // ------------------------------------------------------------------ the emulator ------

#define MISS_GLOBAL
#define MISS_LAUNCH_BOUNDS(threads)
#define MISS_DEVICE inline
#define MISS_RESTRICT
#define MISS_SYNC_THREADS() ::miss::emu::sync_threads()
#define MISS_SHARED_ARRAY(type, name, count)                                                \
  ::miss::device::gptr<type> name(static_cast<type*>(                                      \
      ::miss::emu::shared_array(#name, sizeof(type) * (count), sizeof(type))))

#define threadIdx (::miss::emu::current().threadIdx)
#define blockIdx (::miss::emu::current().blockIdx)
#define blockDim (::miss::emu::current().blockDim)
#define gridDim (::miss::emu::current().gridDim)

// An element of device memory: every read and write goes through the emulator's checks.
template <typename T>
class Ref {
  using Value = std::remove_const_t<T>;
  T* p_;

 public:
  explicit Ref(T* p) : p_(p) {}
  Value load() const {
    Value v{};
    if (emu::access(p_, sizeof(T), false, false)) std::memcpy(&v, p_, sizeof(T));
    return v;
  }
  operator Value() const { return load(); }
  template <typename U, std::enable_if_t<!std::is_same_v<U, Value>, int> = 0>
  explicit operator U() const {
    return static_cast<U>(load());
  }
  const Ref& operator=(const Value& v) const {
    if (emu::access(p_, sizeof(T), true, false)) *p_ = v;
    return *this;
  }
  const Ref& operator=(const Ref& other) const { return *this = other.load(); }
};

// A device pointer: arithmetic as a raw pointer's, element access through Ref.
template <typename T>
class gptr {
  T* p_;

 public:
  gptr(T* p = nullptr) : p_(p) {}  // NOLINT: as implicit as a raw pointer
  template <typename U, std::enable_if_t<std::is_same_v<const U, T>, int> = 0>
  gptr(const gptr<U>& other) : p_(other.raw()) {}  // T* -> const T*
  T* raw() const { return p_; }
  gptr operator+(int64_t i) const { return gptr(p_ + i); }
  Ref<T> operator[](int64_t i) const { return Ref<T>(p_ + i); }
  Ref<T> operator*() const { return Ref<T>(p_); }
};

template <int kVec, typename T>
Pack<std::remove_const_t<T>, kVec> load_pack(gptr<T> p) {
  Pack<std::remove_const_t<T>, kVec> pack{};
  if (!emu::check_alignment(p.raw(), sizeof(pack))) return pack;
  for (int k = 0; k < kVec; ++k) pack.v[k] = p[k].load();
  return pack;
}
template <int kVec, typename T>
void store_pack(gptr<T> p, const Pack<T, kVec>& pack) {
  if (!emu::check_alignment(p.raw(), sizeof(pack))) return;
  for (int k = 0; k < kVec; ++k) p[k] = pack.v[k];
}
inline void atomic_store(gptr<int> p, int value) {
  if (emu::access(p.raw(), sizeof(int), true, true)) *p.raw() = value;
}
inline bool is_finite(double v) { return std::isfinite(v); }
inline void note_philox_call() { emu::note_philox_call(); }
inline void note_fmas(uint64_t count) { emu::note_fmas(count); }
template <typename T>
uint32_t load_bits32(gptr<T> p) {
  static_assert(sizeof(T) == 2, "two 16-bit elements to a register");
  const Pack<std::remove_const_t<T>, 2> pack = load_pack<2>(p);
  uint32_t bits = 0;
  std::memcpy(&bits, &pack, sizeof(bits));
  return bits;
}
inline void mma_m16n8k16_bf16(const uint32_t (&a)[4], const uint32_t (&b)[2], float (&c)[4]) {
  emu::mma_m16n8k16_bf16(a, b, c);
}
inline bool has_mma() { return true; }  // the emulator has every instruction the kernels use
template <typename T>
bool is_null(gptr<T> p) { return p.raw() == nullptr; }

inline int sm_count() { return emu::config().sm_count; }

// Bytes from t's data pointer to one past its last element (any strides, none negative).
inline size_t extent_bytes(const Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return static_cast<size_t>(last + 1) * t.element_size();
}

// The bytes a kernel streams through for t (the cost model's traffic): its elements', or its
// extent's where elements share memory (an expanded tensor).
inline size_t data_bytes(const Tensor& t) {
  return std::min(static_cast<size_t>(t.numel()) * t.element_size(), extent_bytes(t));
}

template <typename T>
gptr<const T> input(const Tensor& t, const char* name) {
  emu::register_buffer(t.const_data_ptr<T>(), extent_bytes(t), data_bytes(t), sizeof(T), emu::Role::kInput, name);
  return gptr<const T>(t.const_data_ptr<T>());
}
template <typename T>
gptr<T> output(Tensor& t, const char* name) {
  emu::register_buffer(t.mutable_data_ptr<T>(), extent_bytes(t), data_bytes(t), sizeof(T), emu::Role::kOutput, name);
  return gptr<T>(t.mutable_data_ptr<T>());
}
template <typename T>
gptr<T> inout(Tensor& t, const char* name) {
  emu::register_buffer(t.mutable_data_ptr<T>(), extent_bytes(t), data_bytes(t), sizeof(T), emu::Role::kInOut, name);
  return gptr<T>(t.mutable_data_ptr<T>());
}

inline emu::Dim3 grid_2d(unsigned int x, unsigned int y) { return emu::Dim3{x, y, 1}; }
inline emu::Dim3 as_dim3(emu::Dim3 d) { return d; }
inline emu::Dim3 as_dim3(unsigned int x) { return emu::Dim3{x, 1, 1}; }
inline emu::Dim3 as_dim3(int x) { return emu::Dim3{static_cast<unsigned int>(x), 1, 1}; }

#define MISS_DEVICE_GUARD(tensor) ((void)(tensor))
// In a profiler range named after the kernel, so a recorded sequence of an emulated op shows
// its launches between its ATen calls.
#define MISS_LAUNCH(kernel, grid, threads, ...)                                                  \
  do {                                                                                          \
    const ::miss::ProfilerRange miss_launch_range("miss::cuda_kernel::" #kernel, {});          \
    ::miss::emu::launch(#kernel, ::miss::device::as_dim3(grid), ::miss::device::as_dim3(threads), \
                        [&] { kernel(__VA_ARGS__); });                                          \
  } while (0)

#endif

constexpr int kThreads = 256;

// Enough blocks to fill the GPU a few times over; grid-stride loops cover the rest, so no
// element count overflows a 32-bit grid dimension.
inline unsigned int blocks_for(int64_t elements) {
  const int64_t needed = (elements + kThreads - 1) / kThreads;
  const int64_t cap = int64_t{32} * sm_count();
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, cap)));
}

}  // namespace MISS_DEVICE_API_NAMESPACE
namespace device = MISS_DEVICE_API_NAMESPACE;
}  // namespace miss

// Grid-stride loop over [0, n) with a 64-bit index.
#define MISS_GRID_STRIDE_LOOP(index, n)                                                   \
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;     \
       index < (n); index += static_cast<int64_t>(blockDim.x) * gridDim.x)

