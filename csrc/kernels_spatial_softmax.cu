// Softmax (or log_softmax) over the spatial positions of each (n, c) row of a contiguous NCDHW
// tensor, times an optional per-channel weight: out[r, i] = exp(x[r, i] - M_r) / S_r * w[c] with
// r = n * C + c, M_r the row maximum and S_r the sum of exp(x - M_r) over the row's L
// positions (D * H * W). log_softmax: (x - M_r - log S_r) * w[c]. Includes no torch header.
//
// Two kernels, 2 reads and 1 write of the tensor (the floor for a softmax whose row does not
// fit on chip; PyTorch's softmax reads it 3 times and the weight's mul is a fourth pass):
//   1. spatial_softmax_stats: each CTA takes one chunk of one row and writes the chunk's
//      (max, sum of exp(x - max)) to partial[r * chunks + chunk];
//   2. spatial_softmax_apply: each CTA combines the `chunks` partials of its row (the same
//      order in every CTA of the row, so they agree bit for bit) and writes its chunk.
// Rows are split into chunks so that rows x chunks CTAs fill the machine whatever the batch.
// Loads and stores are 16-byte vectors when the row length and the pointers allow it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ct3d_async.cuh"
#include "ct3d_epilogue.cuh"
#include "ct3d_host.h"
#include "ct3d_launch.h"
#include "ct3d_params.h"

namespace ct3d {
namespace {

constexpr int kSmThreads = 256;
constexpr int kUnroll = 4;  // 16-byte vectors per thread in flight

// VEC consecutive elements as floats, from one 16-byte load when `vec` (aligned), else one by one.
template <typename T, int VEC>
__device__ __forceinline__ void unpack_vec(const uint4& u, float (&v)[VEC]) {
  static_assert(sizeof(T) * VEC == 16, "one 16-byte vector");
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = elem_to_float<T>(e[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  unpack_vec<T, VEC>(__ldg(reinterpret_cast<const uint4*>(p)), v);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[VEC]) {
  // VEC * sizeof(T) is 16 or 32 bytes (the output is at least as wide as the input)
  constexpr int kPer = 16 / sizeof(T);
  static_assert(VEC % kPer == 0, "whole 16-byte vectors");
#pragma unroll
  for (int q = 0; q < VEC / kPer; ++q) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int j = 0; j < kPer; ++j) e[j] = elem_from_float<T>(v[q * kPer + j]);
    *reinterpret_cast<uint4*>(p + q * kPer) = u;
  }
}

// (m, s) <- the pair for the union of the elements of (m, s) and (m2, s2). -inf max: no finite
// element yet (s == 0, or NaN). A NaN element makes s NaN (exp(NaN - m)), and the row's output
// NaN, as in PyTorch's softmax; exp(-inf - finite) = 0 keeps an empty side out of the sum.
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {  // both sides empty (exp(-inf - -inf) would be NaN)
    s += s2;
    return;
  }
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

// Adds VEC values to the running (m, s): one rescale per vector, one exp per element.
template <int VEC>
__device__ __forceinline__ void accumulate(float& m, float& s, const float (&v)[VEC]) {
  float bm = v[0];
#pragma unroll
  for (int j = 1; j < VEC; ++j) bm = fmaxf(bm, v[j]);
  const float mn = fmaxf(m, bm);
  if (mn == -INFINITY) {  // every value so far is -inf; a NaN element still poisons s
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += (v[j] != v[j]) ? v[j] : 0.f;
    return;
  }
  float add = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) add += expf(v[j] - mn);
  s = s * expf(m - mn) + add;
  m = mn;
}

// The block's combined (m, s), in every thread. Fixed reduction order: deterministic.
__device__ __forceinline__ void block_combine(float& m, float& s) {
  __shared__ float sm_m[kSmThreads / 32], sm_s[kSmThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    combine(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // a previous call's readers are done
  if (lane == 0) {
    sm_m[warp] = m;
    sm_s[warp] = s;
  }
  __syncthreads();
  m = sm_m[0];
  s = sm_s[0];
#pragma unroll
  for (int w = 1; w < kSmThreads / 32; ++w) combine(m, s, sm_m[w], sm_s[w]);
}

template <typename TI, int VEC>
__global__ void __launch_bounds__(kSmThreads)
    spatial_softmax_stats(const TI* __restrict__ x, float2* __restrict__ partial, int64_t L,
                          int64_t chunk, int chunks, bool vec) {
  const int64_t row = blockIdx.x / chunks;
  const int ck = static_cast<int>(blockIdx.x % chunks);
  const int64_t lo = ck * chunk;
  const int64_t hi = lo + chunk < L ? lo + chunk : L;
  const TI* xr = x + row * L;
  float m = -INFINITY, s = 0.f;
  if (vec) {  // lo, hi, L multiples of VEC, row start 16-byte aligned
    constexpr int64_t kStep = static_cast<int64_t>(kSmThreads) * VEC;
    for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC; i < hi; i += kUnroll * kStep) {
      float v[kUnroll][VEC];  // kUnroll loads in flight before the first exp
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * kStep < hi) load_vec<TI, VEC>(xr + i + u * kStep, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * kStep < hi) accumulate<VEC>(m, s, v[u]);
      }
    }
  } else {
    for (int64_t i = lo + threadIdx.x; i < hi; i += kSmThreads) {
      float v[1] = {elem_to_float<TI>(xr[i])};
      accumulate<1>(m, s, v);
    }
  }
  block_combine(m, s);
  if (threadIdx.x == 0) partial[row * chunks + ck] = make_float2(m, s);
}

template <typename TI, typename TO, int VEC>
__global__ void __launch_bounds__(kSmThreads)
    spatial_softmax_apply(const TI* __restrict__ x, TO* __restrict__ out,
                          const float2* __restrict__ partial, const float* __restrict__ weight,
                          int64_t L, int64_t chunk, int chunks, int C, bool log, bool vec) {
  const int64_t row = blockIdx.x / chunks;
  const int ck = static_cast<int>(blockIdx.x % chunks);
  float m = -INFINITY, s = 0.f;
  for (int i = threadIdx.x; i < chunks; i += kSmThreads) {
    const float2 p = partial[row * chunks + i];
    combine(m, s, p.x, p.y);
  }
  block_combine(m, s);
  const float w = weight != nullptr ? weight[row % C] : 1.f;
  // softmax: exp(x - m) * (w / s); log_softmax: (x - (m + log s)) * w
  const float a = log ? m + logf(s) : m;
  const float k = log ? w : w / s;
  const int64_t lo = ck * chunk;
  const int64_t hi = lo + chunk < L ? lo + chunk : L;
  const TI* xr = x + row * L;
  TO* orow = out + row * L;
  if (vec) {
    constexpr int64_t kStep = static_cast<int64_t>(kSmThreads) * VEC;
    for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC; i < hi; i += kUnroll * kStep) {
      float v[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * kStep < hi) load_vec<TI, VEC>(xr + i + u * kStep, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * kStep < hi) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            v[u][j] = log ? (v[u][j] - a) * k : expf(v[u][j] - a) * k;
          }
          store_vec<TO, VEC>(orow + i + u * kStep, v[u]);
        }
      }
    }
  } else {
    for (int64_t i = lo + threadIdx.x; i < hi; i += kSmThreads) {
      const float v = elem_to_float<TI>(xr[i]);
      orow[i] = elem_from_float<TO>(log ? (v - a) * k : expf(v - a) * k);
    }
  }
}

// One-read forms for rows that fit on chip: a thread-block cluster of `csize` <= 8 CTAs per
// row (sm_90), each CTA holding a consecutive part of the row. Each CTA reduces its part to
// (max, sum), publishes it in shared memory, and after a cluster barrier every thread combines
// the csize pairs through distributed shared memory in rank order (every CTA of the row gets
// the same bits); a second barrier keeps each CTA's pair alive until all have read it. Then
// the values still on chip are normalized and written: 1 read and 1 write of the tensor.
//   registers (v17b): up to kOnchipPer 16-byte vectors per thread in registers (16384 float32
//     / 32768 half elements per CTA); 111-187 registers, so one CTA per SM, whose load and
//     store phases do not overlap: 2.63 TB/s measured on the H200, no faster than two kernels;
//   shared (v18): the CTA's part copied to shared memory with cp.async (`nvec` <= kOnchipPer
//     vectors per thread, nvec * 4 KB per CTA: up to 3 CTAs per SM at 64 KB), so one CTA's
//     stores overlap another's loads and the registers stay few.
constexpr int kOnchipPer = 16;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // used by the sm_90 kernels only
// Combines each CTA's (m, s) over the cluster, in rank order, into the row's (max, sum), the
// same in every thread of every CTA of the row; then the factors of finish_vec for the row's
// weight w: a (subtracted) and k (multiplied).
__device__ __forceinline__ void cluster_scale(float m, float s, int csize, float w, bool log,
                                              float& a, float& k) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  block_combine(m, s);
  __shared__ float2 cta_pair;
  if (threadIdx.x == 0) cta_pair = make_float2(m, s);
  cluster.sync();
  m = -INFINITY;
  s = 0.f;
  for (int r = 0; r < csize; ++r) {
    const float2 q = *cluster.map_shared_rank(&cta_pair, r);
    combine(m, s, q.x, q.y);
  }
  cluster.sync();  // no CTA leaves (freeing its cta_pair) before every CTA has read it
  a = log ? m + logf(s) : m;
  k = log ? w : w / s;
}

// out[i] for one 16-byte vector of inputs v: exp(v - a) * k, or (v - a) * k for log_softmax.
template <int VEC>
__device__ __forceinline__ void finish_vec(float (&v)[VEC], float a, float k, bool log) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = log ? (v[j] - a) * k : expf(v[j] - a) * k;
}
#endif

template <typename TI, typename TO, int VEC>
__global__ void __launch_bounds__(kSmThreads)
    spatial_softmax_onchip(const TI* __restrict__ x, TO* __restrict__ out,
                           const float* __restrict__ weight, int64_t L, int C, int csize,
                           bool log) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
  const int64_t row = blockIdx.x / csize;
  const int64_t lo = static_cast<int64_t>(rank) * kSmThreads * kOnchipPer * VEC;
  const TI* xr = x + row * L;
  // element index of this thread's u-th vector (the CTA's vectors are consecutive per u)
  auto at = [&](int u) {
    return lo + (static_cast<int64_t>(u) * kSmThreads + threadIdx.x) * VEC;
  };
  uint4 raw[kOnchipPer];
#pragma unroll
  for (int u = 0; u < kOnchipPer; ++u) {  // every load in flight before the first exp
    if (at(u) < L) raw[u] = __ldg(reinterpret_cast<const uint4*>(xr + at(u)));
  }
  float m = -INFINITY, s = 0.f;
#pragma unroll
  for (int u = 0; u < kOnchipPer; ++u) {
    if (at(u) < L) {
      float v[VEC];
      unpack_vec<TI, VEC>(raw[u], v);
      accumulate<VEC>(m, s, v);
    }
  }
  float a, k;
  cluster_scale(m, s, csize, weight != nullptr ? weight[row % C] : 1.f, log, a, k);
  TO* orow = out + row * L;
#pragma unroll
  for (int u = 0; u < kOnchipPer; ++u) {
    if (at(u) < L) {
      float v[VEC];
      unpack_vec<TI, VEC>(raw[u], v);
      finish_vec<VEC>(v, a, k, log);
      store_vec<TO, VEC>(orow + at(u), v);
    }
  }
#else
  __trap();  // the host launches this kernel on compute capability 9.0 and up only
#endif
}

template <typename TI, typename TO, int VEC>
__global__ void __launch_bounds__(kSmThreads)
    spatial_softmax_onchip_shared(const TI* __restrict__ x, TO* __restrict__ out,
                                  const float* __restrict__ weight, int64_t L, int C, int csize,
                                  int nvec, bool log) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint4 stage[];  // nvec * kSmThreads vectors: the CTA's part of the row
  const int rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
  const int64_t row = blockIdx.x / csize;
  const int64_t lo = static_cast<int64_t>(rank) * nvec * kSmThreads * VEC;
  const TI* xr = x + row * L;
  // Each thread copies, then reads back, only its own vectors (u * kSmThreads + threadIdx.x):
  // waiting for its own cp.async group is enough, no CTA barrier.
  int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC;
  for (int u = 0; u < nvec && i < L; ++u, i += kSmThreads * VEC) {
    cp_async_16(smem_u32(&stage[u * kSmThreads + threadIdx.x]), xr + i);
  }
  cp_async_commit();
  cp_async_wait<0>();
  float m = -INFINITY, s = 0.f;
  i = lo + static_cast<int64_t>(threadIdx.x) * VEC;
#pragma unroll 4
  for (int u = 0; u < nvec && i < L; ++u, i += kSmThreads * VEC) {
    float v[VEC];
    unpack_vec<TI, VEC>(stage[u * kSmThreads + threadIdx.x], v);
    accumulate<VEC>(m, s, v);
  }
  float a, k;
  cluster_scale(m, s, csize, weight != nullptr ? weight[row % C] : 1.f, log, a, k);
  TO* orow = out + row * L;
  i = lo + static_cast<int64_t>(threadIdx.x) * VEC;
#pragma unroll 4
  for (int u = 0; u < nvec && i < L; ++u, i += kSmThreads * VEC) {
    float v[VEC];
    unpack_vec<TI, VEC>(stage[u * kSmThreads + threadIdx.x], v);
    finish_vec<VEC>(v, a, k, log);
    store_vec<TO, VEC>(orow + i, v);
  }
#else
  __trap();  // the host launches this kernel on compute capability 9.0 and up only
#endif
}

template <typename TI, typename TO>
cudaError_t launch_typed(const SpatialSoftmaxParams& p, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(TI);
  const TI* x = static_cast<const TI*>(p.x);
  if (p.cluster > 0) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(p.rows * p.cluster));
    cfg.blockDim = dim3(kSmThreads);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(p.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (p.nvec == 0) {
      return cudaLaunchKernelEx(&cfg, spatial_softmax_onchip<TI, TO, VEC>, x,
                                static_cast<TO*>(p.out), p.weight, p.L, p.C, p.cluster,
                                p.log != 0);
    }
    if (p.nvec < 0 || p.nvec > kOnchipPer) return cudaErrorInvalidValue;
    auto* kernel = spatial_softmax_onchip_shared<TI, TO, VEC>;
    cfg.dynamicSmemBytes = static_cast<size_t>(p.nvec) * kSmThreads * 16;
    // above 48 KB a kernel must opt in, per device (cached: ct3d_host.h)
    const cudaError_t opt_in = opt_in_dynamic_smem(kernel,
                                                   static_cast<int>(cfg.dynamicSmemBytes));
    if (opt_in != cudaSuccess) return opt_in;
    return cudaLaunchKernelEx(&cfg, kernel, x, static_cast<TO*>(p.out), p.weight, p.L, p.C,
                              p.cluster, p.nvec, p.log != 0);
  }
  const dim3 grid(static_cast<unsigned>(p.rows * p.chunks));
  float2* partial = reinterpret_cast<float2*>(p.partial);  // 8-byte aligned (cudaMalloc)
  spatial_softmax_stats<TI, VEC><<<grid, kSmThreads, 0, stream>>>(x, partial, p.L, p.chunk,
                                                                  p.chunks, p.vec != 0);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  spatial_softmax_apply<TI, TO, VEC><<<grid, kSmThreads, 0, stream>>>(
      x, static_cast<TO*>(p.out), partial, p.weight, p.L, p.chunk, p.chunks, p.C, p.log != 0,
      p.vec != 0);
  return cudaGetLastError();
}

}  // namespace

int spatial_softmax_vec(int in_dtype) { return in_dtype == kF32 ? 4 : 8; }

int64_t spatial_softmax_onchip_elems(int in_dtype, int vecs) {
  if (vecs < 0 || vecs > kOnchipPer) return 0;
  return static_cast<int64_t>(kSmThreads) * (vecs == 0 ? kOnchipPer : vecs) *
         spatial_softmax_vec(in_dtype);
}

cudaError_t launch_spatial_softmax(const SpatialSoftmaxParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.L <= 0) return cudaSuccess;
  if (p.rows * (p.cluster > 0 ? p.cluster : p.chunks) > 0x7fffffffLL) {
    return cudaErrorInvalidConfiguration;
  }
  if (p.in_dtype == kF32 && p.out_dtype == kF32) return launch_typed<float, float>(p, stream);
  if (p.in_dtype == kF16 && p.out_dtype == kF16) return launch_typed<__half, __half>(p, stream);
  if (p.in_dtype == kF16 && p.out_dtype == kF32) return launch_typed<__half, float>(p, stream);
  if (p.in_dtype == kBF16 && p.out_dtype == kBF16) {
    return launch_typed<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  if (p.in_dtype == kBF16 && p.out_dtype == kF32) {
    return launch_typed<__nv_bfloat16, float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ct3d
