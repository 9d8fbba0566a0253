// SwiGLU, silu(gate) * up, and its gradient for float32 training on the CPU as two MLX primitives.
//
// MLX's CPU element-wise kernels run on one core while MKL's threads wait; these run on OpenMP's pool (the
// one MKL's GNU threading layer keeps), vectorized by -march=native -ffast-math. The gradient recomputes the
// sigmoid from gate rather than keeping it. Built at run time by engine/native/build.py.

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include <nanobind/nanobind.h>

#include "primitive.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

constexpr long kChunk = 16384;  // floats a task: 64 KB a stream, big enough to amortize the pool's wake-up

void forward(long n, int threads, const float* gate, const float* up, float* out) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long c = 0; c < n; c += kChunk) {
    const long end = std::min(n, c + kChunk);  // a bound computed once: the loop vectorizes
    for (long i = c; i < end; ++i) {
      float g = gate[i];
      out[i] = g / (1.f + std::exp(-g)) * up[i];
    }
  }
}

void backward(long n, int threads, const float* gate, const float* up, const float* ct, float* dgate, float* dup) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long c = 0; c < n; c += kChunk) {
    const long end = std::min(n, c + kChunk);
    for (long i = c; i < end; ++i) {
      float g = gate[i], sig = 1.f / (1.f + std::exp(-g)), silu = g * sig;
      dgate[i] = ct[i] * up[i] * (sig + silu * (1.f - sig));
      dup[i] = ct[i] * silu;
    }
  }
}

class SwiGLUGrad : public lora_tui::CpuPrimitive<lora_tui::Threads> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, t = settings_.threads] {
      return [n = long(in[0].size()), t, g = in[0].data<float>(), u = in[1].data<float>(), c = in[2].data<float>(),
              dg = out[0].data<float>(), du = out[1].data<float>()]() { backward(n, t, g, u, c, dg, du); };
    });
  }
  const char* name() const override { return "LoraTuiCpuSwiGLUGrad"; }
};

class SwiGLU : public lora_tui::CpuPrimitive<lora_tui::Threads> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, t = settings_.threads] {
      return [n = long(out[0].size()), t, g = in[0].data<float>(), u = in[1].data<float>(),
              o = out[0].data<float>()]() { forward(n, t, g, u, o); };
    });
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[1].shape()}, {mx::float32, mx::float32},
        std::make_shared<SwiGLUGrad>(stream(), settings_),
        {primals[0], primals[1], mx::contiguous(cotangents[0], false, stream())});
    return lora_tui::pick(grads, argnums);
  }
  const char* name() const override { return "LoraTuiCpuSwiGLU"; }
};

// silu(gate) * up for float32 arrays of one shape.
mx::array swiglu(const mx::array& gate, const mx::array& up, int threads) {
  if (gate.shape() != up.shape() || gate.dtype() != mx::float32 || up.dtype() != mx::float32) {
    throw std::invalid_argument("cpu swiglu: gate and up must be float32 arrays of one shape");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLU>(s, lora_tui::Threads{std::max(1, threads)}),
                   {mx::contiguous(gate, false, s), mx::contiguous(up, false, s)});
}

}  // namespace

NB_MODULE(_lora_tui_cpu_swiglu, m) {
  m.def("size_of", [](const mx::array& a) { return a.size(); });  // build.py: do arrays pass?
  m.def("swiglu", &swiglu, "gate"_a, "up"_a, "threads"_a);
}
