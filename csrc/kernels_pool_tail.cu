// The pooled tail: avg_pool3d (kernel == stride, no padding, floor mode) of a fused site's
// NCDHW output, then one elementwise activation, in one pass.
//
// After a fused site whose result feeds nn.AvgPool3d / F.avg_pool3d (and an activation), PyTorch
// runs the pool as its own kernel (on the H200, 0.67 ms for l2_3's 1.07 GB float32 output: 1.8
// TB/s, against 4.2 TB/s for a copy) and the activation as another pass over the pooled tensor.
// Here one thread computes one output element: it sums the kd x kh x kw window in the order
// PyTorch's CUDA avg_pool3d does (d, then h, then w), divides by the window size in float, rounds
// to the tensor's dtype (the pooled tensor PyTorch would materialize), applies the activation
// in float and stores once. Consecutive threads take consecutive outputs along W, so a warp
// reads kw * 32 consecutive elements of each input row it touches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ct3d_epilogue.cuh"
#include "ct3d_launch.h"
#include "ct3d_params.h"

namespace ct3d {
namespace {

constexpr int kPoolThreads = 256;
constexpr int kMaxPoolK = 8;  // per dimension (the Python side sends larger windows to PyTorch)

// The activations of the tail, with the formulas of the epilogue program (ct3d_epilogue.cuh).
__device__ __forceinline__ float pool_act(float x, int act, int flag) {
  switch (act) {
    case OP_RELU:
      return x > 0.0f ? x : (x != x ? x : 0.0f);  // NaN passes through, as torch.relu
    case OP_GELU:
      if (flag) {
        const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
        return 0.5f * x * (1.0f + tanhf(k0 * (x + 0.044715f * x * x * x)));
      }
      return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case OP_SILU:
      return x / (1.0f + expf(-x));
    case OP_SIGMOID:
      return 1.0f / (1.0f + expf(-x));
    case OP_TANH:
      return tanhf(x);
    default:
      return x;
  }
}

template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
    pool_tail_kernel(const T* __restrict__ x, T* __restrict__ out, const PoolTailParams p) {
  const int64_t total = p.nc * p.Do * p.Ho * p.Wo;
  const float count = static_cast<float>(p.kd * p.kh * p.kw);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kPoolThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kPoolThreads) {
    int64_t r = i / p.Wo;
    const int ow = static_cast<int>(i - r * p.Wo);
    const int oh = static_cast<int>(r % p.Ho);
    r /= p.Ho;
    const int od = static_cast<int>(r % p.Do);
    const int64_t nc = r / p.Do;
    const T* src = x + ((nc * p.D + static_cast<int64_t>(od) * p.kd) * p.H +
                        static_cast<int64_t>(oh) * p.kh) * p.W + static_cast<int64_t>(ow) * p.kw;
    float sum = 0.0f;
    for (int a = 0; a < p.kd; ++a) {
      for (int b = 0; b < p.kh; ++b) {
        const T* row = src + (static_cast<int64_t>(a) * p.H + b) * p.W;
        for (int c = 0; c < p.kw; ++c) sum += elem_to_float<T>(__ldg(row + c));
      }
    }
    // the pooled value as PyTorch materializes it (rounded to T), then the activation
    const float pooled = elem_to_float<T>(elem_from_float<T>(sum / count));
    out[i] = elem_from_float<T>(pool_act(pooled, p.act, p.act_flag));
  }
}

template <typename T>
cudaError_t launch_typed(const PoolTailParams& p, cudaStream_t stream) {
  const int64_t total = p.nc * p.Do * p.Ho * p.Wo;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kPoolThreads - 1) / kPoolThreads;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 30) ? blocks : (1 << 30));
  pool_tail_kernel<T><<<grid, kPoolThreads, 0, stream>>>(static_cast<const T*>(p.x),
                                                         static_cast<T*>(p.out), p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pool_tail(const PoolTailParams& p, cudaStream_t stream) {
  if (p.kd < 1 || p.kh < 1 || p.kw < 1 || p.kd > kMaxPoolK || p.kh > kMaxPoolK ||
      p.kw > kMaxPoolK) {
    return cudaErrorInvalidValue;
  }
  if (p.act != 0 && p.act != OP_RELU && p.act != OP_GELU && p.act != OP_SILU &&
      p.act != OP_SIGMOID && p.act != OP_TANH) {
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case kF32: return launch_typed<float>(p, stream);
    case kF16: return launch_typed<__half>(p, stream);
    case kBF16: return launch_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ct3d
