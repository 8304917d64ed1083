// Instantiates the fused kernel for TF32 tensor cores. Includes no torch header.
#include "ct3d_conv.cuh"
#include "ct3d_launch.h"

namespace ct3d {

cudaError_t launch_f32_tf32(const ConvParams& p, cudaStream_t stream, int* kernel) {
  return launch_conv<kF32, kModeTensorCore>(p, stream, kernel);
}

}  // namespace ct3d
