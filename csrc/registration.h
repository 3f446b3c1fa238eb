// The schemas of the miss ops, defined once (csrc/registration.cpp) for the `miss` namespace
// and, in builds with the emulator, again for `miss_emulated_cuda` (csrc/emulator/).
#pragma once

#include <torch/library.h>

namespace miss {
void define_schemas(torch::Library& m);
}
