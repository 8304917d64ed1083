// The pooled tail: avg_pool3d or max_pool3d (kernel == stride, no padding, floor mode) of a
// fused site's NCDHW output, then one elementwise activation, in one pass.
//
// After a fused site whose result feeds nn.AvgPool3d / F.avg_pool3d (and an activation), PyTorch
// runs the pool as its own kernel (on the H200, 0.67 ms for l2_3's 1.07 GB float32 output: 1.8
// TB/s, against 4.2 TB/s for a copy) and the activation as another pass over the pooled tensor.
// Here one thread computes one output element: it sums the kd x kh x kw window in the order
// PyTorch's CUDA avg_pool3d does (d, then h, then w), divides by the window size in float, rounds
// to the tensor's dtype (the pooled tensor PyTorch would materialize), applies the activation
// in float and stores once. Consecutive threads take consecutive outputs along W, so a warp
// reads kw * 32 consecutive elements of each input row it touches.
// Not measured yet against a copy's rate (expected: ~0.3 ms on l2_3, one read of the 1.07 GB
// and one write of 134 MB at ~4 TB/s).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

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

// I: the index type of the output position (uint32_t when the output has fewer than 2^32
// elements: three 32-bit divisions per element instead of emulated 64-bit ones, which cost as
// much as the memory traffic on l2_3's 33.5M outputs). K2: the window is 2 x 2 x 2 (the
// common case), known at compile time so that a thread's 8 loads are all in flight at once;
// otherwise each row's kw (<= 8) loads are issued together, the rows one after another.
// The window's reduction: a sum (average pool) or PyTorch's max_pool3d rule (a value replaces
// the maximum when it is larger or NaN, so a NaN anywhere in the window wins).
template <bool MAX>
__device__ __forceinline__ float pool_step(float acc, float v) {
  if constexpr (MAX) {
    return (v > acc || v != v) ? v : acc;
  } else {
    return acc + v;
  }
}

template <typename T, typename I, bool K2, bool MAX>
__global__ void __launch_bounds__(kPoolThreads)
    pool_tail_kernel(const T* __restrict__ x, T* __restrict__ out, const PoolTailParams p) {
  const I total = static_cast<I>(p.nc * p.Do * p.Ho * p.Wo);
  const I wo = static_cast<I>(p.Wo), ho = static_cast<I>(p.Ho), dout = static_cast<I>(p.Do);
  const int kd = K2 ? 2 : p.kd, kh = K2 ? 2 : p.kh, kw = K2 ? 2 : p.kw;
  const float count = static_cast<float>(kd * kh * kw);
  for (I i = static_cast<I>(blockIdx.x) * kPoolThreads + threadIdx.x; i < total;
       i += static_cast<I>(gridDim.x) * kPoolThreads) {
    I r = i / wo;
    const int ow = static_cast<int>(i - r * wo);
    I r2 = r / ho;
    const int oh = static_cast<int>(r - r2 * ho);
    r = r2 / dout;
    const int od = static_cast<int>(r2 - r * dout);
    const int64_t nc = static_cast<int64_t>(r);
    const T* src = x + ((nc * p.D + static_cast<int64_t>(od) * kd) * p.H +
                        static_cast<int64_t>(oh) * kh) * p.W + static_cast<int64_t>(ow) * kw;
    float sum = MAX ? -INFINITY : 0.0f;
    if constexpr (K2) {
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[j] = elem_to_float<T>(__ldg(src + (static_cast<int64_t>(j >> 2) * p.H + ((j >> 1) & 1))
                                                * p.W + (j & 1)));
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) sum = pool_step<MAX>(sum, v[j]);  // d, h, w: PyTorch's order
    } else {
      for (int a = 0; a < kd; ++a) {
        for (int b = 0; b < kh; ++b) {
          const T* row = src + (static_cast<int64_t>(a) * p.H + b) * p.W;
          float v[kMaxPoolK];
#pragma unroll
          for (int c = 0; c < kMaxPoolK; ++c) {
            v[c] = c < kw ? elem_to_float<T>(__ldg(row + c)) : 0.0f;
          }
#pragma unroll
          for (int c = 0; c < kMaxPoolK; ++c) {
            if (c < kw) sum = pool_step<MAX>(sum, v[c]);
          }
        }
      }
    }
    // the pooled value as PyTorch materializes it (rounded to T; a maximum is a T already),
    // then the activation
    const float pooled = MAX ? sum : elem_to_float<T>(elem_from_float<T>(sum / count));
    out[i] = elem_from_float<T>(pool_act(pooled, p.act, p.act_flag));
  }
}

template <typename T>
cudaError_t launch_typed(const PoolTailParams& p, cudaStream_t stream) {
  const int64_t total = p.nc * p.Do * p.Ho * p.Wo;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kPoolThreads - 1) / kPoolThreads;
  // (a grid-stride loop past 2^22 blocks: the 32-bit index of the last stride stays < 2^32)
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 22) ? blocks : (1 << 22));
  const bool narrow = total + static_cast<int64_t>(grid) * kPoolThreads < (int64_t{1} << 32);
  const bool k2 = p.kd == 2 && p.kh == 2 && p.kw == 2;
  auto go = [&](auto kernel) {
    kernel<<<grid, kPoolThreads, 0, stream>>>(static_cast<const T*>(p.x),
                                               static_cast<T*>(p.out), p);
  };
  auto pick = [&](auto max_tag) {
    constexpr bool kMax = decltype(max_tag)::value;
    if (narrow) {
      k2 ? go(pool_tail_kernel<T, uint32_t, true, kMax>)
         : go(pool_tail_kernel<T, uint32_t, false, kMax>);
    } else {
      k2 ? go(pool_tail_kernel<T, int64_t, true, kMax>)
         : go(pool_tail_kernel<T, int64_t, false, kMax>);
    }
  };
  p.max ? pick(std::true_type{}) : pick(std::false_type{});
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
