// What lora-tui's CPU primitives share: running a kernel on MLX's CPU stream, and the Primitive boilerplate.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace lora_tui {

// Gives the outputs their memory, then queues make_kernel() on the stream: the kernel captures the outputs'
// pointers, so they must exist before it is made.
template <typename MakeKernel>
void run_on_cpu(mx::Stream s, const std::vector<mx::array>& in, std::vector<mx::array>& out, MakeKernel make_kernel) {
  for (auto& o : out) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(s);
  for (auto& a : in) encoder.set_input_array(a);
  for (auto& a : out) encoder.set_output_array(a);
  encoder.dispatch(make_kernel());
}

// A primitive that runs on the CPU only, equal to another of its class when their settings are equal (MLX's
// compiler merges equal primitives over equal inputs). Settings: a struct with a defaulted operator==.
template <typename Settings>
class CpuPrimitive : public mx::Primitive {
 public:
  CpuPrimitive(mx::Stream s, Settings settings) : mx::Primitive(s), settings_(settings) {}
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only");
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return settings_ == static_cast<const CpuPrimitive&>(other).settings_;
  }

 protected:
  Settings settings_;
};

// The settings of a primitive whose only setting is how many threads it uses.
struct Threads {
  int threads;
  bool operator==(const Threads&) const = default;
};

// The gradients `argnums` asks for, out of one per input.
inline std::vector<mx::array> pick(const std::vector<mx::array>& grads, const std::vector<int>& argnums) {
  std::vector<mx::array> picked;
  for (int i : argnums) picked.push_back(grads[i]);
  return picked;
}

}  // namespace lora_tui
