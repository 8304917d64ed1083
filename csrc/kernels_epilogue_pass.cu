// The epilogue pass: a fused site's epilogue program (bias included) run in one pass over a
// convolution output that something else computed (cuDNN), from its layout into the output's.
//
// Where cuDNN's conv beats the fused kernel (bf16 on several suite problems; cuDNN in
// channels_last_3d on TF32 l2_100), PyTorch still runs the bias and every op of the epilogue as
// a pass of its own, plus a copy when the conv ran on channels_last_3d copies of an NCDHW model.
// This kernel reads the conv output once and writes the site's result once:
//   * a CTA owns a tile of kTC = 32 channels x kTS = 64 consecutive spatial positions
//     (s = (d * H + h) * W + w) of one sample; it reads the tile into shared memory in the
//     source's layout order (32 consecutive channels per warp load when the source is
//     channels_last_3d, 32 consecutive positions when it is NCDHW), adds the bias, runs the
//     decoded program (ct3d_epilogue.cuh run_program, the fused kernels' interpreter: same
//     arithmetic, float32) and stores the result register in the output's layout order;
//   * the tile pitch is kTS + 1 floats, so both orders reach shared memory without bank
//     conflicts;
//   * source and output have spatial dimensions that collapse to one stride (NCDHW contiguous:
//     1, channels_last_3d: C), checked by the binding; each CTA only reads the elements it
//     writes, so the pass may run in place (source == output, same dtype and strides).
// SOFTMAX and LAYER_NORM (which combine elements across channels or along W) are not run here:
// the binding rejects them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ct3d_epilogue.cuh"
#include "ct3d_host.h"
#include "ct3d_launch.h"
#include "ct3d_params.h"

namespace ct3d {
namespace {

constexpr int kPassThreads = 256;
constexpr int kTC = 32;                                // channels per tile
constexpr int kTS = 64;                                // spatial positions per tile
constexpr int kLD = kTS + 1;                           // tile pitch (floats)
constexpr int kTileFloats = kTC * kLD;                 // one tile register
constexpr int kPer = kTC * kTS / kPassThreads;         // elements per thread (8)
static_assert(kTC == 32 && kTS == 64, "the index math below uses shifts and masks");

template <typename TS, typename TO>
__global__ void __launch_bounds__(kPassThreads)
    epilogue_pass_kernel(const __grid_constant__ EpiPassParams p) {
  extern __shared__ __align__(16) float sR[];  // n_regs tile registers
  __shared__ float s_col[kMaxSlots * kTC];
  __shared__ float s_bias[kTC];
  const int tid = threadIdx.x;
  const int64_t tiles_s = (p.S + kTS - 1) / kTS;
  const int n = static_cast<int>(blockIdx.x / tiles_s);
  const int64_t s0 = (static_cast<int64_t>(blockIdx.x) - n * tiles_s) * kTS;
  const int c0 = blockIdx.y * kTC;
  if (tid < kTC) {
    s_bias[tid] = (p.bias != nullptr && c0 + tid < p.C)
                      ? load_as_float(p.bias, c0 + tid, p.bias_dtype)
                      : 0.0f;
  }
  load_channel_slots<kTC>(p.epi, s_col, c0, p.C - c0, tid, kPassThreads);
  __syncthreads();

  // ---- the conv output + bias -> register 0, in the source's order ----
  {
    const TS* __restrict__ src = static_cast<const TS*>(p.src) + n * p.ss_n;
    float v[kPer];
    int idx[kPer], col[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int e = tid + j * kPassThreads;
      const int cl = p.src_cfast ? (e & (kTC - 1)) : (e >> 6);
      const int sl = p.src_cfast ? (e >> 5) : (e & (kTS - 1));
      const bool ok = c0 + cl < p.C && s0 + sl < p.S;
      idx[j] = cl * kLD + sl;
      col[j] = cl;
      v[j] = ok ? elem_to_float<TS>(src[(c0 + cl) * p.ss_c + (s0 + sl) * p.ss_s]) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) sR[idx[j]] = v[j] + s_bias[col[j]];
  }
  __syncthreads();

  // ---- the program: element i of a thread is tile element tid + i * kPassThreads ----
  const int HW = p.H * p.W;
  auto pos = [&](int i) {
    const int e = tid + i * kPassThreads;
    const int cl = e >> 6, sl = e & (kTS - 1);
    const int64_t s = s0 + sl;
    ElemPos q;
    q.idx = cl * kLD + sl;
    q.ok = c0 + cl < p.C && s < p.S;
    q.col = cl;
    q.n = n;
    q.c = c0 + cl;
    const int si = static_cast<int>(s);  // S < 2^31 (binding)
    q.d = si / HW;
    q.h = (si - q.d * HW) / p.W;
    q.w = si - q.d * HW - q.h * p.W;
    q.yoff = n * p.os_n + static_cast<int64_t>(q.c) * p.os_c + s * p.os_s;
    return q;
  };
  run_program<kPer, decltype(pos), 8, false>(p.epi, sR, kTileFloats, pos, s_col, kTC,
                                             [] { return TileRows{}; });
  __syncthreads();

  // ---- the result register -> the output, in the output's order ----
  {
    const float* res = sR + p.epi.out_reg * kTileFloats;
    TO* __restrict__ out = static_cast<TO*>(p.out) + n * p.os_n;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int e = tid + j * kPassThreads;
      const int cl = p.out_cfast ? (e & (kTC - 1)) : (e >> 6);
      const int sl = p.out_cfast ? (e >> 5) : (e & (kTS - 1));
      if (c0 + cl < p.C && s0 + sl < p.S) {
        out[(c0 + cl) * p.os_c + (s0 + sl) * p.os_s] = elem_from_float<TO>(res[cl * kLD + sl]);
      }
    }
  }
}

template <typename TS, typename TO>
cudaError_t launch_typed(const EpiPassParams& p, cudaStream_t stream) {
  const int64_t tiles_s = (p.S + kTS - 1) / kTS;
  const int64_t gx = static_cast<int64_t>(p.N) * tiles_s;
  const int64_t gy = (p.C + kTC - 1) / kTC;
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > INT32_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = epilogue_pass_kernel<TS, TO>;
  const int smem = p.epi.n_regs * kTileFloats * static_cast<int>(sizeof(float));
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

cudaError_t launch_epilogue_pass(const EpiPassParams& p, cudaStream_t stream) {
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  if (p.S >= (int64_t{1} << 31) - kTS) return cudaErrorInvalidValue;
  const int s = p.src_dtype, o = p.out_dtype;
  if (s == kF32 && o == kF32) return launch_typed<float, float>(p, stream);
  if (s == kBF16 && o == kBF16) return launch_typed<__nv_bfloat16, __nv_bfloat16>(p, stream);
  if (s == kF16 && o == kF16) return launch_typed<__half, __half>(p, stream);
  if (s == kBF16 && o == kF32) return launch_typed<__nv_bfloat16, float>(p, stream);
  if (s == kF16 && o == kF32) return launch_typed<__half, float>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace ct3d
