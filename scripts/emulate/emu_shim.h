// CPU emulation of the kernels in csrc/ct3d_conv.cuh (and the epilogue pass's vector kernels,
// csrc/ct3d_pass_lite.cuh): one std::thread per CUDA thread of a CTA,
// __syncthreads as a std::barrier, __shared__ arrays as function statics (one CTA runs at a
// time), dynamic shared memory as one static buffer. Included before the kernel header (which
// scripts/emulate/emulate.py preprocesses: the host launch code cut, the extern shared array
// replaced by emu_smem). Only what the direct kernel and the FFMA GEMM use is provided; the
// tensor-core paths (mma.sync) do not run here. layernorm_harness.cpp runs the epilogue's
// LayerNorm routine alone (warp shuffles emulated below).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __maxnreg__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __maxnreg__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct EmuDim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim emu_tid, emu_bid;
inline EmuDim emu_grid_dim;  // the harness sets it where a kernel reads gridDim
#define threadIdx emu_tid
#define blockIdx emu_bid
#define gridDim emu_grid_dim

inline std::barrier<>* emu_bar = nullptr;
inline void __syncthreads() { emu_bar->arrive_and_wait(); }

// Warp shuffles: each warp of a CTA exchanges values through its own 32-slot buffer between
// two barriers of its 32 threads (the harness sets emu_warps: one per warp). Every lane of a
// warp must reach each shuffle, as the full-mask shuffles on the GPU require; the mask is
// not checked.
struct EmuWarp {
  std::barrier<> bar{32};
  double slot[32];  // float values are exact in double
};
inline EmuWarp* emu_warps = nullptr;
inline double emu_shfl_xor(double v, int lane_mask) {
  EmuWarp& w = emu_warps[emu_tid.x / 32];
  const unsigned lane = emu_tid.x % 32;
  w.slot[lane] = v;
  w.bar.arrive_and_wait();
  const double r = w.slot[(lane ^ static_cast<unsigned>(lane_mask)) % 32];
  w.bar.arrive_and_wait();
  return r;
}
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  return static_cast<float>(emu_shfl_xor(v, lane_mask));
}
inline double __shfl_xor_sync(unsigned /*mask*/, double v, int lane_mask) {
  return emu_shfl_xor(v, lane_mask);
}
alignas(16) inline unsigned char emu_smem[232448];
// Dynamic shared memory the launch asked for: run_grid (emu_io.h) marks the rest of emu_smem
// unaddressable for AddressSanitizer, so a read or write past the kernel's dynamic shared
// memory fails as it would on the GPU under compute-sanitizer. The harness sets it per launch.
inline size_t emu_smem_bytes = sizeof(emu_smem);

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division, round to nearest
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline unsigned __float_as_uint(float x) {
  unsigned i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
