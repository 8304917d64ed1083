// The channels-last implicit GEMM's W-line tiles (25, 26) for BF16 tensor cores: one configuration
// family per translation unit, so the extension's build compiles them in parallel (ct3d_launch.h).
// Includes no torch header.
#include "ct3d_igemm.cuh"
#include "ct3d_launch.h"

namespace ct3d {

template cudaError_t igemm_wlines<kBF16>(const ConvParams&, const IgemmGeom&, int, cudaStream_t);

}  // namespace ct3d
