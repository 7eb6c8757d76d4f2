// A small C++ stand-in for the parts of the Metal Shading Language (MSL, C++14-based) that the
// kernels in this directory use, so that the exact source MLX generates for them
// (mx.fast.metal_kernel, printed with verbose=True) can be compiled and checked off a Mac.
//
// Two modes:
//   run mode (g++, default): address-space words are empty, every GPU thread of a threadgroup is an
//     OS thread, `threadgroup_barrier` is a std::barrier over the threadgroup and the simd_* functions
//     exchange values through a std::barrier over the simdgroup (32 lanes, as on Apple GPUs).
//     Threadgroups run one after another, so `threadgroup T buf[N];` can be a function-static array.
//   MSHIM_ADDRESS_SPACES (clang -fsyntax-only, aarch64 target): device/constant/threadgroup are distinct
//     clang address spaces, so handing a device pointer to a plain (thread) pointer, or a constant
//     buffer to a device one, is a compile error as it is in MSL. Nothing runs in this mode.
//
// What this cannot tell: whether Apple's compiler accepts the source, GPU rounding (half/bfloat
// arithmetic here goes through float), the order of simd_sum's additions, or speed.
#pragma once

#ifndef MSHIM_ADDRESS_SPACES
#include <unistd.h>

#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#endif

// ---------------------------------------------------------------- scalar types
#ifdef MSHIM_ADDRESS_SPACES
typedef __INT8_TYPE__ int8_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __INT16_TYPE__ int16_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __INT32_TYPE__ int32_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __bf16 bfloat16_t;  // needs -march=armv8.6-a+bf16; like Metal 3.1's `bfloat`
#else
using std::int16_t;
using std::int32_t;
using std::int64_t;
using std::int8_t;
using std::size_t;
using std::uint16_t;
using std::uint32_t;
using std::uint64_t;
using std::uint8_t;

// bfloat16 as 16 stored bits; arithmetic happens in float (Metal's bfloat rounds every operation,
// which the kernels here never rely on: they convert to float before doing math).
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // keep NaN a NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
#endif

typedef _Float16 half;
typedef half float16_t;
typedef bfloat16_t bfloat;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

// ---------------------------------------------------------------- vector types
#ifdef MSHIM_ADDRESS_SPACES
#define MSHIM_VECTORS(T)                                       \
  typedef T T##2 __attribute__((ext_vector_type(2)));          \
  typedef T T##3 __attribute__((ext_vector_type(3)));          \
  typedef T T##4 __attribute__((ext_vector_type(4)));
MSHIM_VECTORS(float)
MSHIM_VECTORS(half)
MSHIM_VECTORS(int)
MSHIM_VECTORS(uint)
MSHIM_VECTORS(short)
MSHIM_VECTORS(ushort)
MSHIM_VECTORS(uchar)
#undef MSHIM_VECTORS
#else
namespace mshim {
template <class T, int N>
struct vec {
  T x{}, y{}, z{}, w{};  // only the first N are used
  vec() = default;
  explicit vec(T s) : x(s), y(s), z(N > 2 ? s : T()), w(N > 3 ? s : T()) {}
  vec(T a, T b, T c = T(), T d = T()) : x(a), y(b), z(c), w(d) {}
  T& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
  T operator[](int i) const { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
};
#define MSHIM_VEC_OP(op)                                                     \
  template <class T, int N>                                                  \
  vec<T, N> operator op(vec<T, N> a, vec<T, N> b) {                          \
    return vec<T, N>(a.x op b.x, a.y op b.y, a.z op b.z, a.w op b.w);        \
  }                                                                          \
  template <class T, int N>                                                  \
  vec<T, N> operator op(vec<T, N> a, T s) { return a op vec<T, N>(s); }     \
  template <class T, int N>                                                  \
  vec<T, N> operator op(T s, vec<T, N> a) { return vec<T, N>(s) op a; }
MSHIM_VEC_OP(+)
MSHIM_VEC_OP(-)
MSHIM_VEC_OP(*)
MSHIM_VEC_OP(/)
#undef MSHIM_VEC_OP
}  // namespace mshim
#define MSHIM_VECTORS(T)            \
  typedef mshim::vec<T, 2> T##2;    \
  typedef mshim::vec<T, 3> T##3;    \
  typedef mshim::vec<T, 4> T##4;
MSHIM_VECTORS(float)
MSHIM_VECTORS(half)
MSHIM_VECTORS(int)
MSHIM_VECTORS(uint)
MSHIM_VECTORS(short)
MSHIM_VECTORS(ushort)
MSHIM_VECTORS(uchar)
#undef MSHIM_VECTORS
#endif

// ---------------------------------------------------------------- metal:: math
namespace metal {
#define MSHIM_UNARY(name, builtin) \
  inline float name(float x) { return builtin(x); } \
  inline half name(half x) { return half(builtin(float(x))); }
MSHIM_UNARY(exp, __builtin_expf)
MSHIM_UNARY(exp2, __builtin_exp2f)
MSHIM_UNARY(log, __builtin_logf)
MSHIM_UNARY(log2, __builtin_log2f)
MSHIM_UNARY(sqrt, __builtin_sqrtf)
MSHIM_UNARY(tanh, __builtin_tanhf)
MSHIM_UNARY(abs, __builtin_fabsf)
MSHIM_UNARY(fabs, __builtin_fabsf)
MSHIM_UNARY(floor, __builtin_floorf)
MSHIM_UNARY(ceil, __builtin_ceilf)
MSHIM_UNARY(round, __builtin_roundf)
#undef MSHIM_UNARY
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
template <class T>
T min(T a, T b) { return b < a ? b : a; }
template <class T>
T max(T a, T b) { return a < b ? b : a; }
template <class T>
T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float fmin(float a, float b) { return __builtin_fminf(a, b); }
inline float fmax(float a, float b) { return __builtin_fmaxf(a, b); }
template <class T>
T select(T a, T b, bool c) { return c ? b : a; }
namespace precise {
using metal::exp;
using metal::log;
using metal::sqrt;
using metal::tanh;
inline float rsqrt(float x) { return metal::rsqrt(x); }
}  // namespace precise
namespace fast {
using metal::exp;
using metal::log;
using metal::sqrt;
using metal::tanh;
inline float rsqrt(float x) { return metal::rsqrt(x); }
}  // namespace fast

enum mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }
}  // namespace metal

// ---------------------------------------------------------------- simdgroup / threadgroup sync
#ifdef MSHIM_ADDRESS_SPACES
namespace metal {
template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_min(T);
template <class T> T simd_shuffle(T, ushort);
template <class T> T simd_broadcast(T, ushort);
template <class T> T simd_shuffle_down(T, ushort);
template <class T> T simd_shuffle_up(T, ushort);
template <class T> T simd_shuffle_xor(T, ushort);
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
}  // namespace metal
#else
namespace mshim {
constexpr int kSimdWidth = 32;
constexpr int kMaxThreadsPerGroup = 1024;

struct SimdState {
  std::unique_ptr<std::barrier<>> bar;
  int active = 0;  // lanes present (fewer than 32 in the last simdgroup of a partial threadgroup)
  alignas(16) unsigned char slot[kSimdWidth][16];
};

struct ThreadCtx {
  SimdState* simd = nullptr;
  std::barrier<>* group = nullptr;
  int lane = 0;
};
inline thread_local ThreadCtx ctx;

// Every lane publishes v, all wait, each reads what it needs, all wait again before the slots
// can be reused. A lane that skips a call while others make it deadlocks, as on a GPU it would be
// undefined; the harness kills the run after its timeout.
template <class T, class F>
T simd_exchange(T v, F&& pick) {
  static_assert(sizeof(T) <= 16, "simd value too large for the shim");
  SimdState& s = *ctx.simd;
  std::memcpy(s.slot[ctx.lane], &v, sizeof(T));
  s.bar->arrive_and_wait();
  T out = pick(s);
  s.bar->arrive_and_wait();
  return out;
}
template <class T>
T slot_value(const SimdState& s, int lane) {
  T v;
  std::memcpy(&v, s.slot[lane], sizeof(T));
  return v;
}
// Every lane gets the fold of all active lanes' values, in lane order (the GPU's order is a tree,
// which the kernels must not depend on).
template <class T, class Op>
T simd_reduce(T v, Op op) {
  return simd_exchange(v, [&](const SimdState& s) {
    T acc = slot_value<T>(s, 0);
    for (int i = 1; i < s.active; i++) acc = op(acc, slot_value<T>(s, i));
    return acc;
  });
}
// The value of lane `src`; a lane whose source is outside the simdgroup keeps its own value, as
// Metal documents for simd_shuffle_down/up.
template <class T>
T simd_from(T v, int src) {
  const int me = ctx.lane;
  return simd_exchange(v, [&](const SimdState& s) {
    return slot_value<T>(s, 0 <= src && src < s.active ? src : me);
  });
}
}  // namespace mshim

namespace metal {
template <class T>
T simd_sum(T v) { return mshim::simd_reduce(v, [](T a, T b) { return T(a + b); }); }
template <class T>
T simd_max(T v) { return mshim::simd_reduce(v, [](T a, T b) { return max(a, b); }); }
template <class T>
T simd_min(T v) { return mshim::simd_reduce(v, [](T a, T b) { return min(a, b); }); }
template <class T>
T simd_shuffle(T v, ushort lane) { return mshim::simd_from(v, int(lane)); }
template <class T>
T simd_broadcast(T v, ushort lane) { return mshim::simd_from(v, int(lane)); }
template <class T>
T simd_shuffle_down(T v, ushort delta) { return mshim::simd_from(v, mshim::ctx.lane + int(delta)); }
template <class T>
T simd_shuffle_up(T v, ushort delta) { return mshim::simd_from(v, mshim::ctx.lane - int(delta)); }
template <class T>
T simd_shuffle_xor(T v, ushort mask) { return mshim::simd_from(v, mshim::ctx.lane ^ int(mask)); }
inline void threadgroup_barrier(mem_flags) { mshim::ctx.group->arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) { mshim::ctx.simd->bar->arrive_and_wait(); }
}  // namespace metal

// ---------------------------------------------------------------- dispatchThreads
namespace mshim {
// The values of Metal's kernel attributes for one thread; member names match the attribute names
// so generated launchers can pass `ids.<attribute>` for each attribute in the signature.
struct Ids {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, grid_size;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint threads_per_simdgroup, simdgroups_per_threadgroup, thread_execution_width;
};

inline uint ceil_div(uint a, uint b) { return (a + b - 1) / b; }

// Runs `kernel(ids)` for every thread of a dispatchThreads(grid, group) call. As MLX does, the
// threadgroup is clipped to the grid; edge threadgroups are partial (non-uniform threadgroups),
// with threads_per_threadgroup the size of that group. Threadgroups run one at a time on a pool
// of OS threads, one per thread of a full threadgroup.
inline void dispatch_threads(uint3 grid, uint3 group, const std::function<void(const Ids&)>& kernel) {
  uint3 g(grid.x < group.x ? grid.x : group.x, grid.y < group.y ? grid.y : group.y,
          grid.z < group.z ? grid.z : group.z);
  const uint pool = g.x * g.y * g.z;
  if (pool == 0 || pool > uint(kMaxThreadsPerGroup)) {
    std::fprintf(stderr, "mshim: threadgroup of %u threads is outside [1, %d]\n", pool, kMaxThreadsPerGroup);
    std::abort();
  }
  const uint3 groups(ceil_div(grid.x, g.x), ceil_div(grid.y, g.y), ceil_div(grid.z, g.z));

  std::barrier<> start(pool + 1), finish(pool + 1);
  std::unique_ptr<std::barrier<>> group_bar;
  std::vector<SimdState> simds(ceil_div(pool, kSimdWidth));
  uint3 origin, size;  // of the current threadgroup, written by the main thread between barriers
  uint3 tg_pos;
  uint active = 0;
  bool done = false;

  auto worker = [&](uint w) {
    for (;;) {
      start.arrive_and_wait();
      if (done) return;
      if (w < active) {
        Ids id{};
        id.thread_position_in_threadgroup = uint3(w % size.x, (w / size.x) % size.y, w / (size.x * size.y));
        id.thread_position_in_grid = origin + id.thread_position_in_threadgroup;
        id.threadgroup_position_in_grid = tg_pos;
        id.threads_per_threadgroup = size;
        id.threadgroups_per_grid = groups;
        id.grid_size = grid;
        id.thread_index_in_threadgroup = w;
        id.thread_index_in_simdgroup = w % kSimdWidth;
        id.simdgroup_index_in_threadgroup = w / kSimdWidth;
        id.threads_per_simdgroup = kSimdWidth;
        id.thread_execution_width = kSimdWidth;
        id.simdgroups_per_threadgroup = ceil_div(active, kSimdWidth);
        ctx.simd = &simds[w / kSimdWidth];
        ctx.group = group_bar.get();
        ctx.lane = int(w % kSimdWidth);
        kernel(id);
      }
      finish.arrive_and_wait();
    }
  };
  std::vector<std::thread> threads;
  for (uint w = 0; w < pool; w++) threads.emplace_back(worker, w);

  for (uint gz = 0; gz < groups.z; gz++)
    for (uint gy = 0; gy < groups.y; gy++)
      for (uint gx = 0; gx < groups.x; gx++) {
        tg_pos = uint3(gx, gy, gz);
        origin = uint3(gx * g.x, gy * g.y, gz * g.z);
        size = uint3(grid.x - origin.x < g.x ? grid.x - origin.x : g.x,
                     grid.y - origin.y < g.y ? grid.y - origin.y : g.y,
                     grid.z - origin.z < g.z ? grid.z - origin.z : g.z);
        active = size.x * size.y * size.z;
        group_bar = std::make_unique<std::barrier<>>(active);
        for (uint s = 0; s < simds.size(); s++) {
          int lanes = int(active) - int(s) * kSimdWidth;
          lanes = lanes < 0 ? 0 : (lanes > kSimdWidth ? kSimdWidth : lanes);
          simds[s].active = lanes;
          simds[s].bar = lanes > 0 ? std::make_unique<std::barrier<>>(lanes) : nullptr;
        }
        start.arrive_and_wait();
        finish.arrive_and_wait();
      }
  done = true;
  start.arrive_and_wait();
  for (auto& t : threads) t.join();
}
}  // namespace mshim
#endif

// ---------------------------------------------------------------- address spaces
// Last, so the words device/constant/thread/threadgroup do not reach the C++ headers above.
#ifdef MSHIM_ADDRESS_SPACES
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup static __attribute__((address_space(3)))
#else
#define device
#define constant
// Only valid on arrays declared in a kernel body (one threadgroup runs at a time); a
// `threadgroup T*` pointer variable would become a static pointer, so the harness refuses those.
#define threadgroup static
#endif
#define thread
