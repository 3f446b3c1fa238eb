// The CUDA execution-model emulator (see emulator.h): fibers for threads, a seeded random
// scheduler, and a shadow of every accessed element for the race, bounds and
// never-written checks.
#include "emulator.h"

#include "../torch_api.h"  // MISS_CHECK
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <unordered_map>

namespace miss {
namespace emu {
namespace {

struct Buffer {
  uintptr_t base = 0;
  size_t bytes = 0, data_bytes = 0, element_size = 1;
  Role role = Role::kInput;
  std::string name;
  bool shared = false;
  std::vector<uint8_t> written;  // per byte; only outputs and shared arrays start unwritten

  bool tracks_writes() const { return shared || role == Role::kOutput; }
  std::string element(uintptr_t address) const {
    std::ostringstream text;
    text << (shared ? "shared '" : "'") << name << "'[" << (address - base) / element_size << "]";
    return text.str();
  }
};

// Who accessed an element: thread `thread` of block `block`, between barriers epoch-1 and
// epoch of that block.
struct Actor {
  int64_t block = -1, thread = -1, epoch = 0;
  bool atomic = false;
  bool valid() const { return block >= 0; }
};

// The last write of an element and up to two reads since (two distinct readers are enough:
// a later writer differs from at least one of them).
struct Shadow {
  Actor writer, reader1, reader2;
};

enum class FiberState { kRunnable, kAtBarrier, kAtWarpSync, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  FiberState state = FiberState::kRunnable;
  ThreadContext built_ins;
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr int64_t kWarpSize = 32;

// The fragments the lanes of one warp hand to a warp-wide mma.
struct WarpExchange {
  uint32_t a[kWarpSize][4];
  uint32_t b[kWarpSize][2];
};

struct Launch {
  bool running = false;
  const char* kernel = "";
  std::map<uintptr_t, Buffer> buffers, shared;
  std::vector<std::unique_ptr<char[]>> shared_storage;
  std::unordered_map<uintptr_t, Shadow> shadow, shared_shadow;
  std::string error;
  int64_t block = 0, epoch = 0;
  std::vector<Fiber> fibers;
  int running_fiber = -1;
  ucontext_t scheduler;
  std::mt19937_64 rng;
  uint64_t launches = 0;
  uint64_t philox_calls = 0;  // of the running launch
  uint64_t fma_count = 0;     // float fused multiply-adds the running launch declared
  uint64_t mma_count = 0;     // warp-wide m16n8k16 products of the running launch
  int64_t max_barriers = 0;   // the most barriers one block of the running launch passed
  std::vector<WarpExchange> warps;  // of the running block
  const std::function<void()>* body = nullptr;
};

thread_local Launch state;
thread_local ThreadContext outside_launch;

int64_t linear(const Dim3& index, const Dim3& extent) {
  return index.x + static_cast<int64_t>(extent.x) * (index.y + static_cast<int64_t>(extent.y) * index.z);
}

Dim3 unlinear(int64_t i, const Dim3& extent) {
  Dim3 index;
  index.x = static_cast<unsigned int>(i % extent.x);
  index.y = static_cast<unsigned int>((i / extent.x) % extent.y);
  index.z = static_cast<unsigned int>(i / (static_cast<int64_t>(extent.x) * extent.y));
  return index;
}

int64_t thread_id() { return linear(current().threadIdx, current().blockDim); }

std::string who(const Actor& a) {
  std::ostringstream text;
  text << "thread " << a.thread << " of block " << a.block << (a.atomic ? " (atomically)" : "");
  return text.str();
}

void fail(const std::string& what) {
  if (!state.error.empty()) return;  // the first problem is the one worth reading
  state.error = "miss emulator: kernel " + std::string(state.kernel) + ": " + what;
}

Buffer* find(std::map<uintptr_t, Buffer>& buffers, uintptr_t address, size_t bytes) {
  auto it = buffers.upper_bound(address);
  while (it != buffers.begin()) {
    --it;
    Buffer& b = it->second;
    if (address >= b.base && address + bytes <= b.base + b.bytes) return &b;
  }
  return nullptr;
}

void yield() {
  Fiber& self = state.fibers[state.running_fiber];
  swapcontext(&self.context, &state.scheduler);
}

void check_race(Shadow& s, const Buffer& buffer, uintptr_t address, bool write, bool atomic) {
  const Actor me{state.block, thread_id(), state.epoch, atomic};
  auto ordered = [&](const Actor& other) {  // a barrier (or program order) separates them
    return other.block == me.block && (other.thread == me.thread || other.epoch < me.epoch);
  };
  auto conflicts = [&](const Actor& other) { return other.valid() && !ordered(other) && !(other.atomic && atomic); };
  const char* verb = write ? " writes " : " reads ";
  auto race = [&](const Actor& other, const char* other_verb) {
    fail("race: " + who(me) + verb + buffer.element(address) + ", which " + who(other) + other_verb +
         " with no barrier between them");
  };
  if (conflicts(s.writer)) {
    race(s.writer, " wrote");
  } else if (write && conflicts(s.reader1)) {
    race(s.reader1, " read");
  } else if (write && conflicts(s.reader2)) {
    race(s.reader2, " read");
  }
  if (write) {
    s.writer = me;
    s.reader1 = s.reader2 = Actor{};
  } else if (!s.reader1.valid() || ordered(s.reader1)) {
    s.reader1 = me;
  } else if (s.reader1.thread != me.thread || s.reader1.block != me.block) {
    s.reader2 = me;
  }
}

void fiber_main() {
  (*state.body)();
  state.fibers[state.running_fiber].state = FiberState::kDone;
}  // returns into state.scheduler (uc_link)

// Makes runnable the lanes of every warp whose lanes all wait at a warp-wide instruction.
void release_complete_warps(int64_t threads) {
  for (int64_t first = 0; first < threads; first += kWarpSize) {
    const int64_t last = std::min(threads, first + kWarpSize);
    bool all = true;
    for (int64_t t = first; t < last && all; ++t) all = state.fibers[t].state == FiberState::kAtWarpSync;
    if (!all) continue;
    for (int64_t t = first; t < last; ++t) state.fibers[t].state = FiberState::kRunnable;
  }
}

void wait_for_warp() {
  state.fibers[state.running_fiber].state = FiberState::kAtWarpSync;
  yield();
}

float bf16_bits_to_float(uint32_t bits) {
  const uint32_t wide = (bits & 0xFFFFu) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

void run_block(int64_t block_id, Dim3 grid, Dim3 block) {
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  state.block = block_id;
  state.epoch = 0;
  state.shared.clear();
  state.shared_storage.clear();
  state.shared_shadow.clear();
  state.warps.assign((threads + kWarpSize - 1) / kWarpSize, WarpExchange{});
  for (int64_t t = 0; t < threads; ++t) {
    Fiber& f = state.fibers[t];
    f.built_ins = ThreadContext{unlinear(t, block), unlinear(block_id, grid), block, grid};
    f.state = FiberState::kRunnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &state.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  std::vector<int> runnable;
  while (true) {
    release_complete_warps(threads);
    runnable.clear();
    int64_t at_barrier = 0, at_warp_sync = 0, done = 0;
    for (int64_t t = 0; t < threads; ++t) {
      const FiberState s = state.fibers[t].state;
      if (s == FiberState::kRunnable) runnable.push_back(static_cast<int>(t));
      at_barrier += s == FiberState::kAtBarrier;
      at_warp_sync += s == FiberState::kAtWarpSync;
      done += s == FiberState::kDone;
    }
    if (runnable.empty()) {
      if (at_warp_sync > 0) {  // a warp-wide instruction that part of the warp never reaches
        std::ostringstream text;
        text << "warp divergence in block " << block_id << ": " << at_warp_sync << " lanes wait at mma.sync while "
             << "the other lanes of their warp have exited (" << done << " threads) or wait at __syncthreads ("
             << at_barrier << ")";
        fail(text.str());
        return;
      }
      if (at_barrier == 0) return;
      if (done > 0) {  // __syncthreads in code that not every thread reaches: a hang on a GPU
        std::ostringstream text;
        text << "barrier divergence in block " << block_id << ": " << at_barrier << " threads wait at "
             << "__syncthreads while " << done << " have exited";
        fail(text.str());
        return;
      }
      ++state.epoch;
      state.max_barriers = std::max(state.max_barriers, state.epoch);
      for (int64_t t = 0; t < threads; ++t) state.fibers[t].state = FiberState::kRunnable;
      continue;
    }
    state.running_fiber = runnable[state.rng() % runnable.size()];
    swapcontext(&state.scheduler, &state.fibers[state.running_fiber].context);
    state.running_fiber = -1;
  }
}

void check_outputs_written() {
  for (auto& [base, b] : state.buffers) {
    if (b.role != Role::kOutput) continue;
    const auto unwritten = std::find(b.written.begin(), b.written.end(), 0);
    if (unwritten != b.written.end()) {
      fail("leaves " + b.element(b.base + (unwritten - b.written.begin())) + " of its output unwritten");
      return;
    }
  }
}

}  // namespace

ThreadContext& current() {
  return state.running_fiber >= 0 ? state.fibers[state.running_fiber].built_ins : outside_launch;
}

Config& config() {
  static thread_local Config c;
  return c;
}

std::vector<std::string>& launch_log() {
  static thread_local std::vector<std::string> log;
  return log;
}

void register_buffer(const void* base, size_t bytes, size_t data_bytes, size_t element_size, Role role,
                     const char* name) {
  if (bytes == 0) return;
  const uintptr_t address = reinterpret_cast<uintptr_t>(base);
  auto it = state.buffers.find(address);
  if (it != state.buffers.end()) {  // the same memory passed twice (src == dst): read and written
    Buffer& b = it->second;
    b.bytes = std::max(b.bytes, bytes);
    b.data_bytes = std::max(b.data_bytes, data_bytes);
    b.role = Role::kInOut;
    b.written.clear();
    return;
  }
  Buffer b{address, bytes, data_bytes, element_size, role, name, false, {}};
  if (role == Role::kOutput) b.written.assign(bytes, 0);
  state.buffers.emplace(address, std::move(b));
}

void note_philox_call() {
  if (state.running) ++state.philox_calls;
}

void note_fmas(uint64_t count) {
  if (state.running) state.fma_count += count;
}

bool check_alignment(const void* address, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(address) % bytes == 0) return true;
  std::ostringstream text;
  text << "misaligned " << bytes << "-byte vector access at " << address << " by thread " << thread_id()
       << " of block " << state.block;
  fail(text.str());
  return false;
}

bool access(const void* address, size_t bytes, bool write, bool atomic) {
  if (!state.running) return true;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  Buffer* buffer = find(state.shared, a, bytes);
  const bool shared = buffer != nullptr;
  if (!shared) buffer = find(state.buffers, a, bytes);
  if (buffer == nullptr) {
    std::ostringstream text;
    text << "out-of-bounds " << (write ? "write" : "read") << " of " << bytes << " bytes at " << address
         << " by thread " << thread_id() << " of block " << state.block << ": no buffer of the launch holds it";
    fail(text.str());
    return false;
  }
  if (buffer->tracks_writes() && !buffer->written.empty()) {
    uint8_t* flags = buffer->written.data() + (a - buffer->base);
    if (write) {
      std::fill(flags, flags + bytes, 1);
    } else if (std::find(flags, flags + bytes, 0) != flags + bytes) {
      fail("thread " + std::to_string(thread_id()) + " of block " + std::to_string(state.block) + " reads " +
           buffer->element(a) + ", which nothing has written");
    }
  }
  if (config().detect_races) {
    check_race((shared ? state.shared_shadow : state.shadow)[a], *buffer, a, write, atomic);
  }
  if (config().preempt > 0 && std::uniform_real_distribution<double>(0, 1)(state.rng) < config().preempt) {
    yield();
  }
  return true;
}

void* shared_array(const char* name, size_t bytes, size_t element_size) {
  for (auto& [base, b] : state.shared) {
    if (b.name == name) {
      MISS_CHECK(b.bytes == bytes, "miss emulator: shared array '", name, "' declared with ", bytes,
                  " and ", b.bytes, " bytes");
      return reinterpret_cast<void*>(base);
    }
  }
  state.shared_storage.emplace_back(new char[bytes]);
  const uintptr_t base = reinterpret_cast<uintptr_t>(state.shared_storage.back().get());
  Buffer b{base, bytes, bytes, element_size, Role::kOutput, name, true, std::vector<uint8_t>(bytes, 0)};
  state.shared.emplace(base, std::move(b));
  return reinterpret_cast<void*>(base);
}

void sync_threads() {
  MISS_CHECK(state.running_fiber >= 0, "miss emulator: __syncthreads outside a kernel");
  state.fibers[state.running_fiber].state = FiberState::kAtBarrier;
  yield();
}

void mma_m16n8k16_bf16(const uint32_t a[4], const uint32_t b[2], float c[4]) {
  MISS_CHECK(state.running_fiber >= 0, "miss emulator: mma.sync outside a kernel");
  const ThreadContext& me = current();
  const int64_t threads = static_cast<int64_t>(me.blockDim.x) * me.blockDim.y * me.blockDim.z;
  const int64_t id = thread_id(), warp = id / kWarpSize, lane = id % kWarpSize;
  if ((warp + 1) * kWarpSize > threads) {
    fail("mma.sync in a warp of " + std::to_string(threads - warp * kWarpSize) + " threads (block of " +
         std::to_string(threads) + "): the instruction needs all 32 lanes");
    return;
  }
  WarpExchange& exchange = state.warps[warp];
  std::copy(a, a + 4, exchange.a[lane]);
  std::copy(b, b + 2, exchange.b[lane]);
  wait_for_warp();  // every lane's fragments are in
  // Element (row, k) of A and (k, col) of B, from the lane and register the PTX ISA puts them in.
  auto a_at = [&](int64_t row, int64_t k) {
    const int64_t holder = (row % 8) * 4 + (k % 8) / 2, reg = (row / 8) + 2 * (k / 8);
    return bf16_bits_to_float(exchange.a[holder][reg] >> (16 * (k % 2)));
  };
  auto b_at = [&](int64_t k, int64_t col) {
    return bf16_bits_to_float(exchange.b[col * 4 + (k % 8) / 2][k / 8] >> (16 * (k % 2)));
  };
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t row = lane / 4 + 8 * (i / 2), col = (lane % 4) * 2 + i % 2;
    float acc = c[i];
    for (int64_t k = 0; k < 16; ++k) acc = std::fma(a_at(row, k), b_at(k, col), acc);
    d[i] = acc;
  }
  wait_for_warp();  // every lane has read the fragments before any lane hands in the next ones
  std::copy(d, d + 4, c);
  if (lane == 0) ++state.mma_count;
}

void launch(const char* kernel, Dim3 grid, Dim3 block, const std::function<void()>& body) {
  MISS_CHECK(!state.running, "miss emulator: a launch inside a kernel");
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  MISS_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64 && blocks >= 1 && grid.y <= 65535 &&
                  grid.z <= 65535 && grid.x <= 2147483647u,
              "miss emulator: kernel ", kernel, ": invalid configuration argument (grid (", grid.x, ", ",
              grid.y, ", ", grid.z, "), block (", block.x, ", ", block.y, ", ", block.z, "))");
  std::ostringstream line;
  line << kernel << " grid=(" << grid.x << "," << grid.y << "," << grid.z << ") block=(" << block.x << ","
       << block.y << "," << block.z << ")";
  // The memory the launch may touch, as name:role:bytes: what benchmarks/gpu_cost_model.py
  // prices a kernel's traffic by (each buffer read and/or written once).
  for (const auto& [base, b] : state.buffers) {
    const char* role = b.role == Role::kInput ? "in" : b.role == Role::kOutput ? "out" : "inout";
    line << " " << b.name << ":" << role << ":" << b.data_bytes;
  }
  launch_log().push_back(line.str());

  state.running = true;
  state.philox_calls = 0;
  state.fma_count = 0;
  state.mma_count = 0;
  state.max_barriers = 0;
  state.kernel = kernel;
  state.error.clear();
  state.shadow.clear();
  state.body = &body;
  state.rng.seed(config().seed * 0x9E3779B97F4A7C15ull + ++state.launches);
  while (state.fibers.size() < static_cast<size_t>(threads)) {
    state.fibers.emplace_back();
    state.fibers.back().stack.reset(new char[kStackBytes]);
  }
  std::vector<int64_t> order(blocks);
  for (int64_t b = 0; b < blocks; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), state.rng);
  for (int64_t b : order) {
    run_block(b, grid, block);
    if (!state.error.empty()) break;
  }
  if (state.error.empty()) check_outputs_written();
  const std::string error = state.error;
  state.running = false;
  if (state.philox_calls) launch_log().back() += " philox=" + std::to_string(state.philox_calls);
  if (state.fma_count) launch_log().back() += " fma=" + std::to_string(state.fma_count);
  if (state.mma_count) launch_log().back() += " mma=" + std::to_string(state.mma_count);
  if (state.max_barriers) launch_log().back() += " barriers=" + std::to_string(state.max_barriers);
  state.buffers.clear();
  state.shared.clear();
  state.shared_storage.clear();
  state.shadow.clear();
  state.shared_shadow.clear();
  MISS_CHECK(error.empty(), error);
}

}  // namespace emu
}  // namespace miss
