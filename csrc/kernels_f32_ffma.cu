// Instantiates the fused kernel for exact FP32 (FFMA). Includes no torch header.
#include "ct3d_conv.cuh"
#include "ct3d_launch.h"

namespace ct3d {

cudaError_t launch_f32_ffma(const ConvParams& p, cudaStream_t stream, int* kernel) {
  return launch_conv<kF32, kModeFfma>(p, stream, kernel);
}

}  // namespace ct3d
