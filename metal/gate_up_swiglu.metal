// Kernel body: gate and up projections of the k selected experts of every token, combined by
// SwiGLU, in one dispatch. MLX wraps this body in a generated signature (mx.fast.metal_kernel);
// the Python side is metal/kernels.py, the pure-MLX twin metal/reference.py.
//
// Inputs:  x (T, D) activations; indices (T*TOPK) expert ids, read here on the GPU;
//          gate_w/up_w (E, F, D*BITS/32) uint32, gate_s/gate_b/up_s/up_b (E, F, D/GS).
// Output:  h (T*TOPK, F) = silu(x W_gate^T) * (x W_up^T) for each (token, slot) pair.
// Template: T activation dtype, GS group size, BITS 4 or 8, D, F, E, TOPK sizes, R rows per simdgroup.
// Grid (32, S * ceil(F / (S*R)), T*TOPK), threadgroup (32, S, 1): simdgroup s of threadgroup y owns
// output rows [(y*S + s)*R, +R) of pair z, every lane a contiguous run of the row, simd_sum per row.

constexpr int RUN = 64 / BITS;            // values per lane per step: two packed words
constexpr int WORDS = D * BITS / 32;      // packed words per weight row
constexpr int GROUPS = D / GS;            // scales (and biases) per weight row

const uint lane = thread_index_in_simdgroup;
const uint pair = threadgroup_position_in_grid.z;
const uint token = pair / TOPK;
const uint row0 = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup
                   + simdgroup_index_in_threadgroup) * R;
// Ids come from the router on the GPU; clamping keeps a bad id inside the weights.
const uint expert = metal::min(static_cast<uint>(indices[pair]), uint(E - 1));

float gate_acc[R];
float up_acc[R];
for (int r = 0; r < R; r++) {
  gate_acc[r] = 0.0f;
  up_acc[r] = 0.0f;
}

for (int k = int(lane) * RUN; k < D; k += 32 * RUN) {
  // x is read once per run and serves both matrices and all R rows.
  float xs[RUN];
  float xsum = 0.0f;
  for (int i = 0; i < RUN; i++) {
    xs[i] = static_cast<float>(x[size_t(token) * D + k + i]);
    xsum += xs[i];
  }
  const int word = k * BITS / 32;
  const int group = k / GS;
  for (int r = 0; r < R; r++) {
    // Rows past F (last threadgroup) compute on row F-1 and are not written.
    const size_t row = size_t(expert) * F + metal::min(row0 + uint(r), uint(F - 1));
    const size_t w = row * WORDS + word;
    const size_t q = row * GROUPS + group;
    gate_acc[r] += static_cast<float>(gate_s[q]) * mxk_qdot_run<BITS>(xs, gate_w[w], gate_w[w + 1])
                 + static_cast<float>(gate_b[q]) * xsum;
    up_acc[r] += static_cast<float>(up_s[q]) * mxk_qdot_run<BITS>(xs, up_w[w], up_w[w + 1])
               + static_cast<float>(up_b[q]) * xsum;
  }
}

for (int r = 0; r < R; r++) {
  const float g = metal::simd_sum(gate_acc[r]);
  const float u = metal::simd_sum(up_acc[r]);
  if (lane == 0 && row0 + uint(r) < uint(F)) {
    h[size_t(pair) * F + row0 + r] = static_cast<T>(mxk_swiglu(g, u));
  }
}
