// Instantiates the fused kernel for TF32 tensor cores. Includes no torch header.
#include "ct3d_conv.cuh"
#include "ct3d_igemm.cuh"
#include "ct3d_wgmma.cuh"
#include "ct3d_launch.h"

namespace ct3d {

cudaError_t launch_f32_tf32(const ConvParams& p, cudaStream_t stream, int* kernel) {
  return launch_conv<kF32, kModeTensorCore>(p, stream, kernel);
}

void igemm_plan(const ConvParams& p, int ck, int bn, IgemmGeom* g) { igemm_geometry(p, ck, bn, *g); }

cudaError_t launch_f32_tf32_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                                 cudaStream_t stream, int* wgmma) {
  return launch_igemm_any<kF32>(p, g, config, stream, wgmma);
}

}  // namespace ct3d
