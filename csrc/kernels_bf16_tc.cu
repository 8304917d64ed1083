// Instantiates the fused kernel for BF16 tensor cores. Includes no torch header.
#include "ct3d_conv.cuh"
#include "ct3d_launch.h"

namespace ct3d {

cudaError_t launch_bf16_tc(const ConvParams& p, cudaStream_t stream, int* kernel) {
  return launch_conv<kBF16, kModeTensorCore>(p, stream, kernel);
}

}  // namespace ct3d
