// Kernel body: down projection of the k selected experts of every token, scaled by the router
// weights and summed over the k experts, in one dispatch. Each output element is owned by one
// simdgroup that adds the experts in slot order: deterministic, no atomics. MLX wraps this body in
// a generated signature (mx.fast.metal_kernel); see metal/kernels.py and metal/reference.py.
//
// Inputs:  h (T*TOPK, F) SwiGLU activations from gate_up_swiglu; indices (T*TOPK) expert ids and
//          weights (T*TOPK) router weights, both read here on the GPU;
//          down_w (E, D, F*BITS/32) uint32, down_s/down_b (E, D, F/GS).
// Output:  y (T, D) = sum_k weights[t, k] * h[t, k] W_down[e_k]^T.
// Template: T activation dtype, GS group size, BITS 4 or 8, F, D, E, TOPK sizes, R rows per simdgroup.
// Grid (32, S * ceil(D / (S*R)), T), threadgroup (32, S, 1): as gate_up_swiglu, one token per z.

constexpr int RUN = 64 / BITS;            // values per lane per step: two packed words
constexpr int WORDS = F * BITS / 32;      // packed words per weight row
constexpr int GROUPS = F / GS;            // scales (and biases) per weight row

const uint lane = thread_index_in_simdgroup;
const uint token = threadgroup_position_in_grid.z;
const uint row0 = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup
                   + simdgroup_index_in_threadgroup) * R;

float acc[R];
for (int r = 0; r < R; r++) {
  acc[r] = 0.0f;
}

for (int slot = 0; slot < TOPK; slot++) {
  const uint pair = token * TOPK + slot;
  const uint expert = metal::min(static_cast<uint>(indices[pair]), uint(E - 1));
  const float routed = static_cast<float>(weights[pair]);
  float part[R];
  for (int r = 0; r < R; r++) {
    part[r] = 0.0f;
  }
  for (int k = int(lane) * RUN; k < F; k += 32 * RUN) {
    float hs[RUN];
    float hsum = 0.0f;
    for (int i = 0; i < RUN; i++) {
      hs[i] = static_cast<float>(h[size_t(pair) * F + k + i]);
      hsum += hs[i];
    }
    const int word = k * BITS / 32;
    const int group = k / GS;
    for (int r = 0; r < R; r++) {
      // Rows past D (last threadgroup) compute on row D-1 and are not written.
      const size_t row = size_t(expert) * D + metal::min(row0 + uint(r), uint(D - 1));
      const size_t w = row * WORDS + word;
      const size_t q = row * GROUPS + group;
      part[r] += static_cast<float>(down_s[q]) * mxk_qdot_run<BITS>(hs, down_w[w], down_w[w + 1])
               + static_cast<float>(down_b[q]) * hsum;
    }
  }
  // The router weight multiplies a lane's partial sum; simd_sum below is linear, so this is
  // the weighted sum of the k expert outputs.
  for (int r = 0; r < R; r++) {
    acc[r] += routed * part[r];
  }
}

for (int r = 0; r < R; r++) {
  const float y = metal::simd_sum(acc[r]);
  if (lane == 0 && row0 + uint(r) < uint(D)) {
    out[size_t(token) * D + row0 + r] = static_cast<T>(y);
  }
}
