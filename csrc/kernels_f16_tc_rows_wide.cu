// The channels-last implicit GEMM's row tiles of 8 warps or capped registers (6-10, 18) for FP16
// tensor cores: one configuration family per translation unit, so the extension's build compiles
// them in parallel (ct3d_launch.h). Includes no torch header.
#include "ct3d_igemm.cuh"
#include "ct3d_launch.h"

namespace ct3d {

template cudaError_t igemm_rows_wide<kF16>(const ConvParams&, const IgemmGeom&, int, cudaStream_t);

}  // namespace ct3d
