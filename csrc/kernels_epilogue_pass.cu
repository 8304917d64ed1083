// The epilogue pass: a fused site's epilogue program (bias included) run in one pass over a
// convolution output that something else computed (cuDNN), from its layout into the output's.
//
// Where cuDNN's conv beats the fused kernel (bf16 on several suite problems; cuDNN in
// channels_last_3d on TF32 l2_100), PyTorch still runs the bias and every op of the epilogue as
// a pass of its own, plus a copy when the conv ran on channels_last_3d copies of an NCDHW model.
// This kernel reads the conv output once and writes the site's result once:
//   * a tile is kTC = 32 channels x TSP consecutive spatial positions (s = (d * H + h) * W + w)
//     of one sample; it is read in the source's layout order (consecutive channels when the
//     source is channels_last_3d, consecutive positions when it is NCDHW), the bias is added,
//     the decoded program runs on it (ct3d_epilogue.cuh run_program, the fused kernels'
//     interpreter: same arithmetic, float32), and the result register is stored in the
//     output's layout order;
//   * tile registers have a pitch of TSP + 1 floats, so both orders reach shared memory without
//     bank conflicts;
//   * source and output have spatial dimensions that collapse to one stride (NCDHW contiguous:
//     1, channels_last_3d: C), checked by the binding; each tile only reads the elements it
//     writes, so the pass may run in place (source == output, same dtype and strides).
// Two kernels:
//   * the staged kernel (the usual one): persistent CTAs, one column of kTC channels each
//     (bias and per-channel operands read once), loop over the tiles of that column; the next
//     tiles' sources are copied into a ring of shared-memory stages with cp.async while the
//     current tile is converted, run and stored, so the loads stay in flight without
//     registers (the program's interpreter needs 128 registers per thread, which leaves 16
//     warps per multiprocessor: too few plain loads in flight to reach HBM bandwidth). Needs
//     the source's elements in 4-byte aligned units along its fast dimension (float32; half
//     types with an even extent there). Copies and output stores take 16 bytes at a time
//     where the binding finds the tensor's fast extent, other strides and pointer allow it
//     (vec_src, vec_side, vec_out), 4-byte copies and scalar stores otherwise;
//   * the plain kernel, one tile per CTA, loads through registers, for the other sources.
// SOFTMAX and LAYER_NORM (which combine elements across channels or along W) are not run here:
// the binding rejects them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ct3d_async.cuh"
#include "ct3d_epilogue.cuh"
#include "ct3d_host.h"
#include "ct3d_launch.h"
#include "ct3d_params.h"
#include "ct3d_pass_lite.cuh"

namespace ct3d {
namespace {

constexpr int kPassThreads = 256;
constexpr int kTC = 32;  // channels per tile

template <int TSP>
struct PassTile {
  static_assert(TSP == 64 || TSP == 128, "spatial tile of 64 or 128 positions");
  static constexpr int kLD = TSP + 1;                      // tile register pitch (floats)
  static constexpr int kTileFloats = kTC * kLD;            // one tile register
  static constexpr int kPer = kTC * TSP / kPassThreads;    // elements per thread
  static constexpr int kShift = TSP == 64 ? 6 : 7;         // log2(TSP)
};

// Element i of a thread in the program's order (consecutive threads, consecutive positions).
template <int TSP>
struct PassPos {
  const EpiPassParams* p;
  int tid, n, c0;
  int64_t s0;
  __device__ __forceinline__ ElemPos operator()(int i) const {
    using T = PassTile<TSP>;
    const int e = tid + i * kPassThreads;
    const int cl = e >> T::kShift, sl = e & (TSP - 1);
    const int64_t s = s0 + sl;
    ElemPos q;
    q.idx = cl * T::kLD + sl;
    q.ok = c0 + cl < p->C && s < p->S;
    q.col = cl;
    q.n = n;
    q.c = c0 + cl;
    const int si = static_cast<int>(s);  // S < 2^31 (binding)
    const int hw = p->H * p->W;
    q.d = si / hw;
    q.h = (si - q.d * hw) / p->W;
    q.w = si - q.d * hw - q.h * p->W;
    q.yoff = n * p->os_n + static_cast<int64_t>(q.c) * p->os_c + s * p->os_s;
    return q;
  }
};

// The result register of the tile (n, s0, c0) -> the output, in the output's order.
template <int TSP, typename TO>
__device__ __forceinline__ void store_pass_tile(const EpiPassParams& p, const float* res, int tid,
                                                int n, int64_t s0, int c0) {
  using T = PassTile<TSP>;
  TO* __restrict__ out = static_cast<TO*>(p.out) + n * p.os_n;
#pragma unroll
  for (int j = 0; j < T::kPer; ++j) {
    const int e = tid + j * kPassThreads;
    const int cl = p.out_cfast ? (e & (kTC - 1)) : (e >> T::kShift);
    const int sl = p.out_cfast ? (e >> 5) : (e & (TSP - 1));
    if (c0 + cl < p.C && s0 + sl < p.S) {
      out[(c0 + cl) * p.os_c + (s0 + sl) * p.os_s] = elem_from_float<TO>(res[cl * T::kLD + sl]);
    }
  }
}

// As store_pass_tile, 16 bytes (V elements along the output's fast dimension) per store; the
// binding checks that the fast extent, the other strides and the pointer allow it, so a
// vector is wholly inside or wholly outside the output.
template <int TSP, typename TO>
__device__ __forceinline__ void store_pass_tile_vec(const EpiPassParams& p, const float* res,
                                                    int tid, int n, int64_t s0, int c0) {
  using T = PassTile<TSP>;
  constexpr int V = 16 / static_cast<int>(sizeof(TO));
  constexpr int kVecs = kTC * TSP / V;
  TO* __restrict__ out = static_cast<TO*>(p.out) + n * p.os_n;
#pragma unroll 2
  for (int j = 0; j < kVecs / kPassThreads; ++j) {
    const int u = tid + j * kPassThreads;
    int cl, sl, step;  // first element (cl, sl); elements j at res[first + j * step]
    if (p.out_cfast) {
      cl = (u % (kTC / V)) * V;
      sl = u / (kTC / V);
      step = T::kLD;
    } else {
      sl = (u % (TSP / V)) * V;
      cl = u / (TSP / V);
      step = 1;
    }
    if (c0 + cl < p.C && s0 + sl < p.S) {
      const float* r = res + cl * T::kLD + sl;
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (V == 4) {
          w[k] = __float_as_uint(r[k * step]);
        } else {
          w[k] = float_to_half_bits<TO>(r[2 * k * step]) |
                 (float_to_half_bits<TO>(r[(2 * k + 1) * step]) << 16);
        }
      }
      *reinterpret_cast<uint4*>(out + (c0 + cl) * p.os_c + (s0 + sl) * p.os_s) =
          make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

__device__ __forceinline__ void load_column(const EpiPassParams& p, float* s_bias, float* s_col,
                                            int c0, int tid) {
  if (tid < kTC) {
    s_bias[tid] = (p.bias != nullptr && c0 + tid < p.C)
                      ? load_as_float(p.bias, c0 + tid, p.bias_dtype)
                      : 0.0f;
  }
  load_channel_slots<kTC>(p.epi, s_col, c0, p.C - c0, tid, kPassThreads);
}

// ---- the plain kernel: one tile per CTA, loads through registers ----
template <typename TS, typename TO>
__global__ void __launch_bounds__(kPassThreads)
    epilogue_pass_kernel(const __grid_constant__ EpiPassParams p) {
  constexpr int TSP = 64;
  using T = PassTile<TSP>;
  extern __shared__ __align__(16) float sR[];  // n_regs tile registers
  __shared__ float s_col[kMaxSlots * kTC];
  __shared__ float s_bias[kTC];
  const int tid = threadIdx.x;
  const int64_t tiles_s = (p.S + TSP - 1) / TSP;
  const int n = static_cast<int>(blockIdx.x / tiles_s);
  const int64_t s0 = (static_cast<int64_t>(blockIdx.x) - n * tiles_s) * TSP;
  const int c0 = blockIdx.y * kTC;
  load_column(p, s_bias, s_col, c0, tid);
  __syncthreads();
  {
    const TS* __restrict__ src = static_cast<const TS*>(p.src) + n * p.ss_n;
    float v[T::kPer];
    int idx[T::kPer], col[T::kPer];
#pragma unroll
    for (int j = 0; j < T::kPer; ++j) {
      const int e = tid + j * kPassThreads;
      const int cl = p.src_cfast ? (e & (kTC - 1)) : (e >> T::kShift);
      const int sl = p.src_cfast ? (e >> 5) : (e & (TSP - 1));
      const bool ok = c0 + cl < p.C && s0 + sl < p.S;
      idx[j] = cl * T::kLD + sl;
      col[j] = cl;
      v[j] = ok ? elem_to_float<TS>(src[(c0 + cl) * p.ss_c + (s0 + sl) * p.ss_s]) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < T::kPer; ++j) sR[idx[j]] = v[j] + s_bias[col[j]];
  }
  __syncthreads();
  const PassPos<TSP> pos{&p, tid, n, c0, s0};
  run_program<T::kPer, PassPos<TSP>, 8, false>(p.epi, sR, T::kTileFloats, pos, s_col, kTC,
                                                [] { return TileRows{}; });
  __syncthreads();
  store_pass_tile<TSP, TO>(p, sR + p.epi.out_reg * T::kTileFloats, tid, n, s0, c0);
}

// ---- the staged kernel: persistent CTAs, a ring of K stages filled with cp.async ----
// Stage layout (elements of TS): NCDHW data [cl][sl], channels_last_3d data [sl][cl], each a
// contiguous run of the tensor's fast dimension, copied in 4-byte units of U elements. A stage
// holds the tile of the source and, where p.side_slot >= 0, the tile of that slot (laid out
// like the output). K - 1 tiles are in flight while one is run: ~48-64 KB per CTA, about what
// HBM bandwidth x latency needs per multiprocessor (one tile, 8-16 KB, reached ~1.1 TB/s).
template <typename TS>
struct StagedPos : PassPos<128> {
  const TS* side;  // this tile's side stage, or nullptr
  int side_cfast;
  __device__ __forceinline__ float staged(int i) const {
    const int e = tid + i * kPassThreads;
    const int cl = e >> 7, sl = e & 127;
    return elem_to_float<TS>(side[side_cfast ? sl * kTC + cl : cl * 128 + sl]);
  }
};

template <typename TS, typename TO, int K>
__global__ void __launch_bounds__(kPassThreads)
    epilogue_pass_staged_kernel(const __grid_constant__ EpiPassParams p) {
  constexpr int TSP = 128;
  using T = PassTile<TSP>;
  constexpr int U = 4 / static_cast<int>(sizeof(TS));  // elements per 4-byte unit
  constexpr int kTileElems = kTC * TSP;
  constexpr int kUnits = kTileElems / U;
  extern __shared__ __align__(16) float sR[];  // n_regs tile registers, then K stages
  const bool side = p.side_slot >= 0;
  const int stage_elems = kTileElems * (side ? 2 : 1);
  TS* stages = reinterpret_cast<TS*>(sR + p.epi.n_regs * T::kTileFloats);
  __shared__ float s_col[kMaxSlots * kTC];
  __shared__ float s_bias[kTC];
  const int tid = threadIdx.x;
  const int c0 = blockIdx.y * kTC;
  const int64_t tiles_s = (p.S + TSP - 1) / TSP;
  const int64_t n_tiles = static_cast<int64_t>(p.N) * tiles_s;
  const int64_t G = gridDim.x;
  int64_t t = blockIdx.x;
  if (t >= n_tiles) return;  // uniform, before any barrier
  load_column(p, s_bias, s_col, c0, tid);

  // copies of one tensor's tile into a stage: base (sample n's start), element strides, order
  auto copy_tile = [&](const TS* base, int64_t sc, int64_t ss, bool cfast, int64_t s0,
                       uint32_t dst0, bool vec) {
    if (vec) {  // 16-byte units of V elements along the fast dimension
      constexpr int V = 16 / static_cast<int>(sizeof(TS));
      constexpr int kVecUnits = kTileElems / V;
#pragma unroll 1
      for (int u = tid; u < kVecUnits; u += kPassThreads) {
        int cl, sl, off;
        if (cfast) {
          cl = (u % (kTC / V)) * V;
          sl = u / (kTC / V);
          off = sl * kTC + cl;
        } else {
          sl = (u % (TSP / V)) * V;
          cl = u / (TSP / V);
          off = cl * TSP + sl;
        }
        const bool ok = c0 + cl < p.C && s0 + sl < p.S;
        const TS* src = base + (ok ? (c0 + cl) * sc + (s0 + sl) * ss : 0);
        cp_async_16_zfill(dst0 + off * static_cast<uint32_t>(sizeof(TS)), src, ok);
      }
      return;
    }
    for (int u = tid; u < kUnits; u += kPassThreads) {
      int cl, sl, off;
      if (cfast) {
        cl = (u % (kTC / U)) * U;
        sl = u / (kTC / U);
        off = sl * kTC + cl;
      } else {
        sl = (u % (TSP / U)) * U;
        cl = u / (TSP / U);
        off = cl * TSP + sl;
      }
      // a unit's first element decides: the fast extent is a multiple of U (binding)
      const bool ok = c0 + cl < p.C && s0 + sl < p.S;
      const TS* src = base + (ok ? (c0 + cl) * sc + (s0 + sl) * ss : 0);
      cp_async_4(dst0 + off * static_cast<uint32_t>(sizeof(TS)), src, ok);
    }
  };
  auto issue = [&](int64_t tile, int slot) {
    if (tile < n_tiles) {
      const int n = static_cast<int>(tile / tiles_s);
      const int64_t s0 = (tile - static_cast<int64_t>(n) * tiles_s) * TSP;
      TS* st = stages + slot * stage_elems;
      copy_tile(static_cast<const TS*>(p.src) + n * p.ss_n, p.ss_c, p.ss_s, p.src_cfast != 0,
                s0, smem_u32(st), p.vec_src != 0);
      if (side) {
        copy_tile(static_cast<const TS*>(p.epi.slot[p.side_slot].ptr) + n * p.os_n, p.os_c,
                  p.os_s, p.out_cfast != 0, s0, smem_u32(st + kTileElems), p.vec_side != 0);
      }
    }
    cp_async_commit();  // an empty group past the end keeps the group count uniform
  };

#pragma unroll
  for (int k = 0; k < K - 1; ++k) issue(t + k * G, k);
  for (int it = 0; t < n_tiles; t += G, ++it) {
    issue(t + (K - 1) * G, (it + K - 1) % K);
    cp_async_wait<K - 1>();  // the oldest group, this tile's, has landed
    __syncthreads();         // every thread's copies of it, and s_bias / s_col
    const int n = static_cast<int>(t / tiles_s);
    const int64_t s0 = (t - static_cast<int64_t>(n) * tiles_s) * TSP;
    const TS* st = stages + (it % K) * stage_elems;
    // stage -> register 0 (+ bias), in the stage's order: conflict-free on both sides
#pragma unroll
    for (int j = 0; j < T::kPer; ++j) {
      const int e = tid + j * kPassThreads;
      int cl, sl;
      if (p.src_cfast) {
        cl = e & (kTC - 1);
        sl = e >> 5;
      } else {
        cl = e >> T::kShift;
        sl = e & (TSP - 1);
      }
      sR[cl * T::kLD + sl] = elem_to_float<TS>(st[e]) + s_bias[cl];
    }
    __syncthreads();
    StagedPos<TS> pos;
    pos.p = &p;
    pos.tid = tid;
    pos.n = n;
    pos.c0 = c0;
    pos.s0 = s0;
    pos.side = st + kTileElems;
    pos.side_cfast = p.out_cfast;
    run_program<T::kPer, StagedPos<TS>, 8, false, 8>(p.epi, sR, T::kTileFloats, pos, s_col,
                                                      kTC, [] { return TileRows{}; });
    __syncthreads();
    if (p.vec_out) {
      store_pass_tile_vec<TSP, TO>(p, sR + p.epi.out_reg * T::kTileFloats, tid, n, s0, c0);
    } else {
      store_pass_tile<TSP, TO>(p, sR + p.epi.out_reg * T::kTileFloats, tid, n, s0, c0);
    }
    __syncthreads();  // the next iteration refills this stage and rewrites register 0
  }
  cp_async_wait<0>();  // (only empty groups can be left)
}

// Stages in the ring: K - 1 in flight of stage_bytes each, aiming at 48-64 KB.
inline int pass_stages(int stage_bytes) {
  return stage_bytes >= 24 * 1024 ? 3 : stage_bytes >= 12 * 1024 ? 4 : 8;
}

template <typename TS, typename TO, int K>
cudaError_t launch_staged(const EpiPassParams& p, cudaStream_t stream, int64_t gy) {
  constexpr int TSP = 128;
  auto kernel = epilogue_pass_staged_kernel<TS, TO, K>;
  const int stage_bytes = kTC * TSP * static_cast<int>(sizeof(TS)) * (p.side_slot >= 0 ? 2 : 1);
  const int smem = p.epi.n_regs * PassTile<TSP>::kTileFloats * static_cast<int>(sizeof(float)) +
                   K * stage_bytes;
  int static_bytes = 0;
  cudaError_t e = kernel_static_smem(kernel, &static_bytes);
  if (e != cudaSuccess) return e;
  if (smem + static_bytes > max_smem_optin()) return cudaErrorNotSupported;
  if (smem + static_bytes > 48 * 1024) {
    e = opt_in_dynamic_smem(kernel, smem);
    if (e != cudaSuccess) return e;
  }
  int sms = 0, per_sm = 0;
  if (!current_device_attribute(cudaDevAttrMultiProcessorCount, &sms)) sms = 132;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPassThreads, smem);
  if (e != cudaSuccess || per_sm < 1) per_sm = 1;
  const int64_t n_tiles = static_cast<int64_t>(p.N) * ((p.S + TSP - 1) / TSP);
  int64_t gx = (static_cast<int64_t>(sms) * per_sm + gy - 1) / gy;
  if (gx > n_tiles) gx = n_tiles;
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), kPassThreads, smem,
           stream>>>(p);
  return cudaGetLastError();
}

// The vector kernels (ct3d_pass_lite.cuh), where the binding allowed them (p.lite) and the
// program is one they run; cudaErrorNotSupported otherwise (the caller takes the others).
template <typename TS, typename TO>
cudaError_t launch_lite(const EpiPassParams& p, cudaStream_t stream) {
  if (p.lite == kLiteOff || !lite_program_ok(p.epi)) return cudaErrorNotSupported;
  if (p.lite == kLiteTranspose || p.lite == kLiteTransposeScalarOut) {
    const int64_t tiles = static_cast<int64_t>(p.N) * ((p.S + kLiteTS - 1) / kLiteTS);
    const int64_t gy = (p.C + kLiteTC - 1) / kLiteTC;
    if (tiles > INT32_MAX || gy > 65535) return cudaErrorNotSupported;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(gy), 1);
    if (p.lite == kLiteTranspose) {
      epilogue_pass_lite_t_kernel<TS, TO, true><<<grid, kLiteThreads, 0, stream>>>(p);
    } else {
      epilogue_pass_lite_t_kernel<TS, TO, false><<<grid, kLiteThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  }
  const bool cfast = p.src_cfast != 0;
  const int64_t per_sample = static_cast<int64_t>(p.C) * p.S / kLiteE;
  if (per_sample >= (int64_t{1} << 31) - kLiteThreads) return cudaErrorNotSupported;
  int64_t gx = (per_sample + kLiteThreads - 1) / kLiteThreads;
  const int64_t gy = p.N < 65535 ? p.N : 65535;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
  if (cfast) {
    epilogue_pass_lite_kernel<TS, TO, true><<<grid, kLiteThreads, 0, stream>>>(p);
  } else {
    epilogue_pass_lite_kernel<TS, TO, false><<<grid, kLiteThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename TS, typename TO>
cudaError_t launch_typed(const EpiPassParams& p, cudaStream_t stream, int* ran) {
  const int64_t gy = (p.C + kTC - 1) / kTC;
  if (p.N == 0 || p.S == 0 || gy == 0) return cudaSuccess;
  if (gy > 65535) return cudaErrorInvalidConfiguration;
  {
    const cudaError_t e = launch_lite<TS, TO>(p, stream);
    if (e != cudaErrorNotSupported) {
      *ran = p.lite == kLiteSame ? kPassLiteSame : kPassLiteTranspose;
      return e;
    }
  }
  const int regs_bytes = p.epi.n_regs * static_cast<int>(sizeof(float));
  if (p.staged) {
    const int stage_bytes =
        kTC * 128 * static_cast<int>(sizeof(TS)) * (p.side_slot >= 0 ? 2 : 1);
    cudaError_t e;
    switch (pass_stages(stage_bytes)) {
      case 3: e = launch_staged<TS, TO, 3>(p, stream, gy); break;
      case 4: e = launch_staged<TS, TO, 4>(p, stream, gy); break;
      default: e = launch_staged<TS, TO, 8>(p, stream, gy); break;
    }
    if (e != cudaErrorNotSupported) {  // else the ring does not fit: the plain kernel
      *ran = kPassStaged;
      return e;
    }
  }
  *ran = kPassPlain;
  constexpr int TSP = 64;
  const int64_t gx = static_cast<int64_t>(p.N) * ((p.S + TSP - 1) / TSP);
  if (gx > INT32_MAX) return cudaErrorInvalidConfiguration;
  auto kernel = epilogue_pass_kernel<TS, TO>;
  const int smem = regs_bytes * PassTile<TSP>::kTileFloats;
  int static_bytes = 0;
  cudaError_t e = kernel_static_smem(kernel, &static_bytes);
  if (e != cudaSuccess) return e;
  if (smem + static_bytes > 48 * 1024) {
    e = opt_in_dynamic_smem(kernel, smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), kPassThreads, smem,
           stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_epilogue_pass(const EpiPassParams& p, cudaStream_t stream, int* kernel) {
  int ran = kPassNone;
  int* k = kernel != nullptr ? kernel : &ran;
  *k = kPassNone;
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  if (p.S >= (int64_t{1} << 31) - 128) return cudaErrorInvalidValue;
  const int s = p.src_dtype, o = p.out_dtype;
  if (s == kF32 && o == kF32) return launch_typed<float, float>(p, stream, k);
  if (s == kBF16 && o == kBF16) return launch_typed<__nv_bfloat16, __nv_bfloat16>(p, stream, k);
  if (s == kF16 && o == kF16) return launch_typed<__half, __half>(p, stream, k);
  if (s == kBF16 && o == kF32) return launch_typed<__nv_bfloat16, float>(p, stream, k);
  if (s == kF16 && o == kF32) return launch_typed<__half, float>(p, stream, k);
  return cudaErrorInvalidValue;
}

}  // namespace ct3d
