// Instantiates the fused kernel for BF16 tensor cores. Includes no torch header.
#include "ct3d_conv.cuh"
#include "ct3d_igemm.cuh"
#include "ct3d_wgmma.cuh"
#include "ct3d_launch.h"

namespace ct3d {

cudaError_t launch_bf16_tc(const ConvParams& p, cudaStream_t stream, int* kernel) {
  return launch_conv<kBF16, kModeTensorCore>(p, stream, kernel);
}

cudaError_t launch_bf16_tc_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                 cudaStream_t stream, int* wgmma) {
  return launch_igemm_any<kBF16>(p, g, config, stream, wgmma);
}

}  // namespace ct3d
