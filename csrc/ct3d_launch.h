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

}  // namespace ct3d
