// SwiGLU, silu(gate) * up, and its gradient for float32 training on the CPU as two MLX primitives.
//
// MLX's CPU element-wise kernels run on one core while MKL's threads wait; these run on OpenMP's pool (the
// one MKL's GNU threading layer keeps), vectorized by -march=native -ffast-math. The gradient recomputes the
// sigmoid from gate rather than keeping it. Built at run time by engine/native/build.py.

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include <nanobind/nanobind.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
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

class SwiGLUGrad : public mx::Primitive {
 public:
  SwiGLUGrad(mx::Stream s, int threads) : mx::Primitive(s), threads_(threads) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& o : out) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    for (auto& a : out) enc.set_output_array(a);
    enc.dispatch([n = long(in[0].size()), threads = threads_, g = in[0].data<float>(), u = in[1].data<float>(),
                  c = in[2].data<float>(), dg = out[0].data<float>(), du = out[1].data<float>()]() {
      backward(n, threads, g, u, c, dg, du);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("lora-tui's CPU SwiGLU has no GPU kernel");
  }
  const char* name() const override { return "LoraTuiCpuSwiGLUGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const SwiGLUGrad&>(other).threads_;
  }

 private:
  int threads_;
};

class SwiGLU : public mx::UnaryPrimitive {
 public:
  SwiGLU(mx::Stream s, int threads) : mx::UnaryPrimitive(s), threads_(threads) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([n = long(out.size()), threads = threads_, g = in[0].data<float>(), u = in[1].data<float>(),
                  o = out.data<float>()]() { forward(n, threads, g, u, o); });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lora-tui's CPU SwiGLU has no GPU kernel");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[1].shape()}, {mx::float32, mx::float32},
        std::make_shared<SwiGLUGrad>(stream(), threads_),
        {primals[0], primals[1], mx::contiguous(cotangents[0], false, stream())});
    std::vector<mx::array> picked;
    for (int i : argnums) picked.push_back(grads[i]);
    return picked;
  }
  const char* name() const override { return "LoraTuiCpuSwiGLU"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const SwiGLU&>(other).threads_;
  }

 private:
  int threads_;
};

// silu(gate) * up for float32 arrays of one shape.
mx::array swiglu(const mx::array& gate, const mx::array& up, int threads) {
  if (gate.shape() != up.shape() || gate.dtype() != mx::float32 || up.dtype() != mx::float32) {
    throw std::invalid_argument("cpu swiglu: gate and up must be float32 arrays of one shape");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLU>(s, std::max(1, threads)),
                   {mx::contiguous(gate, false, s), mx::contiguous(up, false, s)});
}

}  // namespace

NB_MODULE(_lora_tui_cpu_swiglu, m) {
  m.def("size_of", [](const mx::array& a) { return a.size(); });  // build.py: do arrays pass?
  m.def("swiglu", &swiglu, "gate"_a, "up"_a, "threads"_a);
}
