// The channels-last implicit GEMM's row tiles of 4 warps (configurations 0-5) for TF32 tensor
// cores: one configuration family per translation unit, so the extension's build compiles them in
// parallel (ct3d_launch.h). Includes no torch header.
#include "ct3d_igemm.cuh"
#include "ct3d_launch.h"

namespace ct3d {

template cudaError_t igemm_rows<kF32>(const ConvParams&, const IgemmGeom&, int, cudaStream_t);

// The GEMM's geometry (dtype-independent), here rather than in kernels_f32_tf32.cu, which must
// not see the families' definitions.
void igemm_plan(const ConvParams& p, int ck, int bn, IgemmGeom* g) {
  igemm_geometry(p, ck, bn, *g);
}

}  // namespace ct3d
