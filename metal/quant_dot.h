// Shared helpers of the fused expert kernels; MLX puts this text before each generated kernel
// (mx.fast.metal_kernel `header=`). MSL, C++14-based.
//
// Affine quantization as mx.quantize writes it (mode "affine"): a row of K weights is stored as
// K * BITS / 32 uint32 words, value j of a word in bits [BITS*j, BITS*j + BITS); scales and biases
// hold one entry per GROUP consecutive values of the row, and w = scale * q + bias.
//
// Each lane of a simdgroup handles a run of two consecutive words of a row (16 values at 4 bits,
// 8 at 8 bits). A group (32, 64 or 128 values) is a whole number of runs, so one scale and one
// bias cover a run and
//   sum_i x_i * w_i = scale * sum_i x_i * q_i + bias * sum_i x_i,
// which lets a lane sum its activations once and reuse that sum for every row it visits.

// sum_i xs[i] * q_i over the 64 / BITS values packed in the words w0, w1 (before scale and bias).
template <int BITS>
inline float mxk_qdot_run(thread const float* xs, uint w0, uint w1) {
  constexpr int per_word = 32 / BITS;
  constexpr uint mask = (1u << BITS) - 1u;
  float acc0 = 0.0f;
  float acc1 = 0.0f;
  for (int j = 0; j < per_word; j++) {
    acc0 += xs[j] * float((w0 >> (BITS * j)) & mask);
    acc1 += xs[per_word + j] * float((w1 >> (BITS * j)) & mask);
  }
  return acc0 + acc1;
}

// silu(g) * u, the SwiGLU combination of Mixtral's experts (w2(silu(w1 x) * w3 x)).
inline float mxk_swiglu(float g, float u) {
  return g / (1.0f + metal::exp(-g)) * u;
}
