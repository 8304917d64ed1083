// Instantiates the fused kernel for FP16 tensor cores (the strided-input GEMM and the direct
// kernel) and the channels-last GEMM's dispatch over its configuration families, which
// kernels_f16_tc_<family>.cu instantiate. Includes no torch header and no family definition
// (ct3d_igemm.cuh, ct3d_wgmma.cuh): the dispatch must not instantiate them here.
#include "ct3d_conv.cuh"
#include "ct3d_launch.h"

namespace ct3d {

cudaError_t launch_f16_tc(const ConvParams& p, cudaStream_t stream, int* kernel) {
  return launch_conv<kF16, kModeTensorCore>(p, stream, kernel);
}

cudaError_t launch_f16_tc_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                cudaStream_t stream, int* wgmma) {
  return launch_igemm_any<kF16>(p, g, config, stream, wgmma);
}

}  // namespace ct3d
