// Entry points of the kernels, one per (input dtype, arithmetic) pair, each compiled in its own
// translation unit (kernels_*.cu) so the builds run in parallel. Plain C++: the binding
// (g++) and the nvcc compile check include it without torch.
#pragma once

#include <cuda_runtime_api.h>

#include "ct3d_params.h"

namespace ct3d {

// Each launches the fused kernel for `p` on `stream`, sets *kernel to the kernel that ran
// (kKernelGemm, or kKernelDirect / kKernelDirectStaged: FP32 FFMA in every precision, for few
// input channels) and returns the launch status (cudaErrorInvalidConfiguration when the grid
// would exceed CUDA's limits).
cudaError_t launch_f32_ffma(const ConvParams& p, cudaStream_t stream, int* kernel);  // exact FP32
cudaError_t launch_f32_tf32(const ConvParams& p, cudaStream_t stream, int* kernel);  // TF32 MMA
cudaError_t launch_f16_tc(const ConvParams& p, cudaStream_t stream, int* kernel);    // FP16 MMA
cudaError_t launch_bf16_tc(const ConvParams& p, cudaStream_t stream, int* kernel);   // BF16 MMA

// The channels-last implicit GEMM (ct3d_igemm.cuh; groups == 1, tensor cores): packs x into
// g.xp (scratch the caller allocated, N*Dp*Hp*Wp*Cp elements) and runs the GEMM with the packed
// weight g.wp; config = tile configuration id (launch_igemm_any below); sets
// *wgmma to whether the sm_90a wgmma kernel ran (configurations 19-24 on a compute capability
// 9.0 device; elsewhere they fall back to the mma.sync box tiles).
// igemm_plan fills g's extents for K steps of ck channels and tiles of bn channels.
void igemm_plan(const ConvParams& p, int ck, int bn, IgemmGeom* g);
cudaError_t launch_f32_tf32_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                  cudaStream_t stream, int* wgmma);
cudaError_t launch_f16_tc_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                cudaStream_t stream, int* wgmma);
cudaError_t launch_bf16_tc_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                 cudaStream_t stream, int* wgmma);

// The channels-last GEMM's configuration families (ct3d_igemm.cuh, ct3d_wgmma.cuh), each
// explicitly instantiated per input dtype in its own translation unit
// (kernels_<dtype>_<family>.cu): the extension's build compiles them in parallel. Declared
// here, not defined, so a translation unit that only dispatches instantiates no kernel.
template <int IN_DT>
cudaError_t igemm_rows(const ConvParams& p, const IgemmGeom& g, int config, cudaStream_t stream);
template <int IN_DT>
cudaError_t igemm_rows_wide(const ConvParams& p, const IgemmGeom& g, int config,
                            cudaStream_t stream);
template <int IN_DT>
cudaError_t igemm_boxes(const ConvParams& p, const IgemmGeom& g, int config, cudaStream_t stream,
                        bool* fits);
template <int IN_DT>
cudaError_t igemm_wlines(const ConvParams& p, const IgemmGeom& g, int config,
                         cudaStream_t stream);
template <int IN_DT>
cudaError_t igemm_wgmmas(const ConvParams& p, const IgemmGeom& g, int config, cudaStream_t stream,
                         bool* fits, int* fallback);

// Runs tile configuration `config` (ids in ct3d_igemm.cuh and ct3d_wgmma.cuh): a wgmma
// configuration whose patch does not fit (or off sm_90) falls back to its box configuration, a
// box configuration that does not fit to its row tile. Sets *wgmma (when given) to 1 when the
// wgmma kernel ran, 2 when its bulk-copy form (27, 28) ran, 0 for the mma.sync kernels, and -1
// when a bulk configuration could not run (nothing launched: its blocked weight fits no other
// kernel; the caller repacks and runs another configuration). cudaErrorInvalidValue for an
// unknown id.
template <int IN_DT>
cudaError_t launch_igemm_any(const ConvParams& p, const IgemmGeom& g, int config,
                             cudaStream_t stream, int* wgmma = nullptr) {
  if (wgmma != nullptr) *wgmma = 0;
  if ((config >= 19 && config <= 24) || config == 27 || config == 28) {
    bool fits = false;
    int fallback = config;
    const cudaError_t e = igemm_wgmmas<IN_DT>(p, g, config, stream, &fits, &fallback);
    if (e != cudaSuccess) return e;
    if (fits) {
      if (wgmma != nullptr) *wgmma = config >= 27 ? 2 : 1;
      return e;
    }
    if (fallback < 0) {  // a bulk configuration (blocked weight) that cannot run: nothing ran
      if (wgmma != nullptr) *wgmma = -1;
      return e;
    }
    config = fallback;
  }
  if (config >= 11 && config <= 17) {
    bool fits = true;
    const cudaError_t e = igemm_boxes<IN_DT>(p, g, config, stream, &fits);
    if (fits) return e;
    constexpr int kBoxFallback[7] = {0, 4, 3, 0, 5, 8, 1};  // row tile of the same K step, BN
    config = kBoxFallback[config - 11];
  }
  if (config >= 0 && config <= 5) return igemm_rows<IN_DT>(p, g, config, stream);
  if ((config >= 6 && config <= 10) || config == 18) {
    return igemm_rows_wide<IN_DT>(p, g, config, stream);
  }
  if (config == 25 || config == 26) return igemm_wlines<IN_DT>(p, g, config, stream);
  return cudaErrorInvalidValue;
}

// The spatial softmax (csrc/kernels_spatial_softmax.cu) on `stream`: one kernel of thread-block
// clusters when p.cluster > 0 (the registers form when p.nvec == 0, else the shared-memory
// form), else two (the rows' partial max and sum, then the normalized output);
// cudaErrorInvalidValue for an unsupported dtype pair. spatial_softmax_vec: elements of a
// 16-byte vector of input dtype `in_dtype`; spatial_softmax_onchip_elems: elements of a row one
// CTA of a cluster kernel holds with `vecs` vectors per thread (0: the registers form's 16;
// returns 0 for vecs outside [0, 16]).
cudaError_t launch_spatial_softmax(const SpatialSoftmaxParams& p, cudaStream_t stream);
int spatial_softmax_vec(int in_dtype);
int64_t spatial_softmax_onchip_elems(int in_dtype, int vecs);

// The pooled tail (csrc/kernels_pool_tail.cu) on `stream`; cudaErrorInvalidValue for an
// unsupported dtype or activation, or a pooling kernel outside [1, 8] per dimension.
cudaError_t launch_pool_tail(const PoolTailParams& p, cudaStream_t stream);

// The normalization tail (csrc/kernels_norm_tail.cu) on `stream`: three kernels (partial
// statistics, per-group mean / rstd, the normalized output); cudaErrorInvalidValue for an
// unsupported dtype or activation, C not a multiple of groups, or rows * chunks >= 2^31.
cudaError_t launch_norm_tail(const NormTailParams& p, cudaStream_t stream);

// The epilogue pass (csrc/kernels_epilogue_pass.cu) on `stream`: cudaErrorInvalidValue for an
// unsupported (src, out) dtype pair (f32 -> f32, f16 / bf16 -> same or f32), a register count
// outside [1, kMaxRegs] or S >= 2^31 - 128. `kernel` (may be null) receives which kernel ran.
enum PassKernel : int { kPassNone = 0, kPassPlain = 1, kPassStaged = 2, kPassLiteSame = 3,
                        kPassLiteTranspose = 4 };
cudaError_t launch_epilogue_pass(const EpiPassParams& p, cudaStream_t stream,
                                 int* kernel = nullptr);

}  // namespace ct3d
