// Entry points of the kernels, one per (input dtype, arithmetic) pair, each compiled in its own
// translation unit (kernels_*.cu) so the builds run in parallel. Plain C++: the binding
// (g++) and the nvcc compile check include it without torch.
#pragma once

#include <cuda_runtime_api.h>

#include "ct3d_params.h"

namespace ct3d {

// Each launches the fused kernel for `p` on `stream`, sets *kernel to the kernel that ran
// (kKernelGemm, or kKernelDirect: FP32 FFMA in every precision, for few input channels) and
// returns the launch status (cudaErrorInvalidConfiguration when the grid would exceed CUDA's
// limits).
cudaError_t launch_f32_ffma(const ConvParams& p, cudaStream_t stream, int* kernel);  // exact FP32
cudaError_t launch_f32_tf32(const ConvParams& p, cudaStream_t stream, int* kernel);  // TF32 MMA
cudaError_t launch_f16_tc(const ConvParams& p, cudaStream_t stream, int* kernel);    // FP16 MMA
cudaError_t launch_bf16_tc(const ConvParams& p, cudaStream_t stream, int* kernel);   // BF16 MMA

// The channels-last implicit GEMM (ct3d_igemm.cuh; groups == 1, tensor cores): packs x into
// g.xp (scratch the caller allocated, N*Dp*Hp*Wp*Cp elements) and runs the GEMM with the packed
// weight g.wp; config = tile configuration id (ct3d_wgmma.cuh launch_igemm_any); sets
// *wgmma to whether the sm_90a wgmma kernel ran (configurations 19-22 on a compute capability
// 9.0 device; elsewhere they fall back to the mma.sync box tiles).
// igemm_plan fills g's extents for K steps of ck channels and tiles of bn channels.
void igemm_plan(const ConvParams& p, int ck, int bn, IgemmGeom* g);
cudaError_t launch_f32_tf32_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                  cudaStream_t stream, int* wgmma);
cudaError_t launch_f16_tc_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                cudaStream_t stream, int* wgmma);
cudaError_t launch_bf16_tc_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                 cudaStream_t stream, int* wgmma);

}  // namespace ct3d
