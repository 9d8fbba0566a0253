// Rotary position embedding (mx.fast.rope over all of each head's dimensions, positions from 0; pairs split in
// halves, or adjacent in the traditional form that GGUF bases use) and its gradient for float32 training on
// the CPU, as MLX primitives.
//
// The model hands RoPE a transposed (B, L, H, D) view as (B, H, L, D); MLX's CPU rope runs on one core and
// the attention then copies its result. Here every row is rotated on every core, read through its strides
// and written contiguous, so the attention primitive takes it as it is. The gradient is the rotation back.
// Built at run time by engine/native/build.py.

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

namespace {

struct Layout {
  long b, h, l, d;           // the logical (B, H, L, D) shape
  long sb, sh, sl, sd;       // the input's strides, in floats
};

// out = x rotated by +angle (direction 1) or -angle (-1, the gradient): pair i, (i, i + D/2) or in the
// traditional form (2i, 2i + 1), at position l turns by l * scale * base^(-2i / D), as mx.fast.rope computes it
// in float32.
void rotate(const Layout& s, float base, float scale, bool traditional, int direction, int threads, const float* x,
            float* out) {
  const long half = s.d / 2;
  std::vector<float> cosines(s.l * half), sines(s.l * half);
  for (long i = 0; i < half; ++i) {
    float inv_freq = std::exp(-float(i) * (std::log(base) / float(half)));
    for (long l = 0; l < s.l; ++l) {
      float theta = float(l) * scale * inv_freq;
      cosines[l * half + i] = std::cos(theta);
      sines[l * half + i] = direction * std::sin(theta);
    }
  }
  const long rows = s.b * s.h * s.l;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; ++r) {
    long l = r % s.l, h = (r / s.l) % s.h, b = r / (s.l * s.h);
    const float* in = x + b * s.sb + h * s.sh + l * s.sl;
    float* o = out + r * s.d;
    const float* c = cosines.data() + l * half;
    const float* n = sines.data() + l * half;
    const long first = traditional ? 2 : 1, second = traditional ? 1 : half;  // pair i: (first i, first i + second)
    for (long i = 0; i < half; ++i) {
      float a = in[first * i * s.sd], z = in[(first * i + second) * s.sd];
      o[first * i] = a * c[i] - z * n[i];
      o[first * i + second] = z * c[i] + a * n[i];
    }
  }
}

Layout layout_of(const mx::array& x) {
  return {x.shape(0), x.shape(1), x.shape(2), x.shape(3), long(x.strides()[0]), long(x.strides()[1]),
          long(x.strides()[2]), long(x.strides()[3])};
}

class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream s, float base, float scale, bool traditional, int direction, int threads)
      : mx::UnaryPrimitive(s), base_(base), scale_(scale), traditional_(traditional), direction_(direction),
        threads_(threads) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    enc.set_output_array(out);
    enc.dispatch([s = layout_of(in[0]), base = base_, scale = scale_, traditional = traditional_,
                  direction = direction_, threads = threads_, x = in[0].data<float>(), o = out.data<float>()]() {
      rotate(s, base, scale, traditional, direction, threads, x, o);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("lora-tui's CPU RoPE has no GPU kernel");
  }
  // A rotation's transpose is the rotation back.
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cotangents,
                             const std::vector<int>&, const std::vector<mx::array>&) override {
    auto& g = cotangents[0];
    auto back = std::make_shared<Rope>(stream(), base_, scale_, traditional_, -direction_, threads_);
    return {mx::array(g.shape(), mx::float32, back, {g})};
  }
  const char* name() const override { return "LoraTuiCpuRope"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return base_ == o.base_ && scale_ == o.scale_ && traditional_ == o.traditional_ && direction_ == o.direction_ &&
           threads_ == o.threads_;
  }

 private:
  float base_, scale_;
  bool traditional_;
  int direction_, threads_;
};

// mx.fast.rope(x, D, traditional=traditional, base=base, scale=scale, offset=0) for a float32 (B, H, L, D) array.
mx::array rope(const mx::array& x, float base, float scale, bool traditional, int threads) {
  if (x.ndim() != 4 || x.dtype() != mx::float32 || x.shape(3) % 2 != 0) {
    throw std::invalid_argument("cpu rope: a float32 (B, H, L, D) array with an even D");
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<Rope>(mx::to_stream(mx::Device::cpu), base, scale, traditional, 1,
                                          std::max(1, threads)),
                   {x});
}

}  // namespace

NB_MODULE(_lora_tui_cpu_rope, m) {
  m.def("size_of", [](const mx::array& a) { return a.size(); });  // build.py: do arrays pass?
  m.def("rope", &rope, "x"_a, "base"_a, "scale"_a, "traditional"_a, "threads"_a);
}
