// Rotary position embedding (mx.fast.rope over all of each head's dimensions, positions from 0; pairs split in
// halves, or adjacent in the traditional form that GGUF bases use) and its gradient for float32 training on
// the CPU, as MLX primitives.
//
// It takes (B, L, H, D), the layout the model's projections make (positions on axis 1), read through its
// strides and written contiguous, so the attention primitive takes it as it is; MLX's CPU rope runs on one
// core, and on the model's transposed view. Here every row is rotated on every core. The gradient is the
// rotation back.
// Built at run time by engine/native/build.py.

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#include "primitive.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

struct Layout {
  long b, h, l, d;           // batch, heads, positions, head size
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
  for (long r = 0; r < rows; ++r) {  // row r of the contiguous (B, L, H, D) output
    long h = r % s.h, l = (r / s.h) % s.l, b = r / (s.l * s.h);
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

Layout layout_of(const mx::array& x) {  // x is (B, L, H, D)
  return {x.shape(0), x.shape(2), x.shape(1), x.shape(3), long(x.strides()[0]), long(x.strides()[2]),
          long(x.strides()[1]), long(x.strides()[3])};
}

struct RopeSettings {
  float base, scale;
  bool traditional;
  int direction, threads;
  bool operator==(const RopeSettings&) const = default;
};

class Rope : public lora_tui::CpuPrimitive<RopeSettings> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, r = settings_] {
      return [s = layout_of(in[0]), r, x = in[0].data<float>(), o = out[0].data<float>()]() {
        rotate(s, r.base, r.scale, r.traditional, r.direction, r.threads, x, o);
      };
    });
  }
  // A rotation's transpose is the rotation back.
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cotangents,
                             const std::vector<int>&, const std::vector<mx::array>&) override {
    RopeSettings back = settings_;
    back.direction = -back.direction;
    auto& g = cotangents[0];
    return {mx::array(g.shape(), mx::float32, std::make_shared<Rope>(stream(), back), {g})};
  }
  const char* name() const override { return "LoraTuiCpuRope"; }
};

// mx.fast.rope(x, D, traditional=traditional, base=base, scale=scale, offset=0) for a float32 (B, L, H, D) array
// (MLX's takes (B, H, L, D)).
mx::array rope(const mx::array& x, float base, float scale, bool traditional, int threads) {
  if (x.ndim() != 4 || x.dtype() != mx::float32 || x.shape(3) % 2 != 0) {
    throw std::invalid_argument("cpu rope: a float32 (B, L, H, D) array with an even D");
  }
  auto settings = RopeSettings{base, scale, traditional, 1, std::max(1, threads)};
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(mx::to_stream(mx::Device::cpu), settings), {x});
}

}  // namespace

NB_MODULE(_lora_tui_cpu_rope, m) {
  m.def("size_of", [](const mx::array& a) { return a.size(); });  // build.py: do arrays pass?
  m.def("rope", &rope, "x"_a, "base"_a, "scale"_a, "traditional"_a, "threads"_a);
}
