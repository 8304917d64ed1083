// The channels-last implicit GEMM's sm_90a wgmma tiles (19-24) for FP16 tensor cores: one
// configuration family per translation unit, so the extension's build compiles them in parallel
// (ct3d_launch.h). Includes no torch header.
#include "ct3d_wgmma.cuh"
#include "ct3d_launch.h"

namespace ct3d {

template cudaError_t igemm_wgmmas<kF16>(const ConvParams&, const IgemmGeom&, int,
                                          cudaStream_t, bool*, int*);

}  // namespace ct3d
