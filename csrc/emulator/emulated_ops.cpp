// torch.ops.miss_emulated_cuda: every miss op, with the same schema, run on CPU tensors as
// if they were CUDA tensors. The op bodies of csrc/ops/ are the ones torch.ops.miss runs;
// while one runs here, emulating_cuda() is true, so every routing decision (MISS_ROUTE,
// on_cuda_path) goes the CUDA way and the CUDA kernels run under the emulator, with its race,
// bounds and never-written checks. Tests compare these ops with torch.ops.miss on the CPU
// and with the float64 reference (tests/test_emulated_cuda.py).
//
// Also here: configure(seed, detect_races, sm_count, preempt), launch_log(clear) and
// planted_bug(out, kind), kernels with a known bug that prove the checks can fail, and
// mma_probe(a, b), the emulated tensor-core instruction against the ISA's fragment layout.
#include <torch/csrc/stable/library.h>

#include <string>
#include <utility>
#include <vector>

#include "../kernels.h"
#include "../ops/ops.h"
#include "../registration.h"
#include "emulator.h"

namespace miss {
namespace {

thread_local bool emulating = false;

class EmulatingCuda {
 public:
  EmulatingCuda() : previous_(emulating) { emulating = true; }
  ~EmulatingCuda() { emulating = previous_; }

 private:
  bool previous_;
};

template <typename F, F f>
struct Emulated;

template <typename R, typename... Args, R (*f)(Args...)>
struct Emulated<R (*)(Args...), f> {
  static R call(Args... args) {
    const EmulatingCuda scope;
    return f(std::forward<Args>(args)...);
  }
};

#define MISS_EMULATED(name) &::miss::Emulated<decltype(&::miss::name), &::miss::name>::call

void configure(int64_t seed, bool detect_races, int64_t sm_count, double preempt) {
  MISS_CHECK(sm_count >= 1, "miss_emulated_cuda.configure: argument 'sm_count' must be >= 1, got ", sm_count);
  MISS_CHECK(preempt >= 0 && preempt <= 1, "miss_emulated_cuda.configure: argument 'preempt' must be in [0, 1], got ",
              preempt);
  emu::Config& c = emu::config();
  c.seed = static_cast<uint64_t>(seed);
  c.detect_races = detect_races;
  c.sm_count = static_cast<int>(sm_count);
  c.preempt = preempt;
}

std::vector<std::string> launch_log(bool clear) {
  std::vector<std::string> log = emu::launch_log();
  if (clear) emu::launch_log().clear();
  return log;
}

}  // namespace

bool emulating_cuda() { return emulating; }

void planted_bug(Tensor& out, const std::string& kind);  // planted_bugs.cpp
Tensor mma_probe(const Tensor& a, const Tensor& b);        // mma_probe.cpp

}  // namespace miss

STABLE_TORCH_LIBRARY(miss_emulated_cuda, m) {
  miss::define_schemas(m);
  m.def("configure(int seed=0, bool detect_races=True, int sm_count=4, float preempt=0.125) -> ()");
  m.def("launch_log(bool clear=False) -> str[]");
  m.def("planted_bug(Tensor(a!) out, str kind) -> ()");
  m.def("mma_probe(Tensor a, Tensor b) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(miss_emulated_cuda, CPU, m) {
#define MISS_IMPL_EMULATED_OP(name) m.impl(#name, TORCH_BOX(MISS_EMULATED(name)));
  MISS_FOR_EACH_OP(MISS_IMPL_EMULATED_OP)
#undef MISS_IMPL_EMULATED_OP
  m.impl("planted_bug", TORCH_BOX(&miss::planted_bug));
  m.impl("mma_probe", TORCH_BOX(&miss::mma_probe));
}

// No tensor arguments, so no backend key to dispatch on: the composite key serves every
// backend.
STABLE_TORCH_LIBRARY_IMPL(miss_emulated_cuda, CompositeExplicitAutograd, m) {
  m.impl("configure", TORCH_BOX(&miss::configure));
  m.impl("launch_log", TORCH_BOX(&miss::launch_log));
}
