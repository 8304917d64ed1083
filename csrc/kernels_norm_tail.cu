// The normalization tail: GroupNorm (InstanceNorm3d is GroupNorm with one channel per group) of a
// fused site's contiguous NCDHW output, its per-channel affine, then one elementwise activation.
//
// PyTorch runs nn.GroupNorm on a (16, 128, 34, 34, 34) bfloat16 tensor (l2_61) in about 0.7 ms
// on the H200, one CTA per (n, group) reading 629K elements, and the activation after it as
// another pass. Here three kernels run in turn on one stream:
//   1. norm_stats_kernel: one CTA per (row, chunk), a row being one (n, c) plane of S = D * H * W
//      contiguous elements and a chunk norm_chunk(dtype) of them (8192 float32, 16384 16-bit
//      elements). Each thread reads four (float32) or eight (16-bit) 8-element vectors, 128
//      bytes, all before any arithmetic (16-byte loads where S % 8 == 0; otherwise a vector's
//      elements lie kNormThreads apart, so that each scalar load of a warp reads 32 consecutive
//      elements: see norm_vec_start), computes each
//      vector's mean and sum of squared deviations (M2) in float and merges them into its
//      running (count, mean, M2) by Chan's rule; the warp and then the CTA merge the same way;
//      the CTA writes its (count, mean, M2) to p.partial. No atomics: the result does not
//      depend on timing.
//   2. norm_finalize_kernel: one warp per (n, group) merges the group's C / groups * chunks
//      partials in double and writes mean and rstd = 1 / sqrt(max(var, 0) + eps), the biased
//      variance, as nn.GroupNorm uses.
//   3. norm_apply_kernel: the same grid as 1; each CTA takes its channel's a = rstd * weight[c]
//      and b = bias[c] - a * mean, computes a * x + b per element (as PyTorch's GroupNorm
//      kernel does), rounds it to the tensor's dtype (the tensor PyTorch would materialize),
//      applies the activation in float and stores once (with no activation: stores a * x + b,
//      the same rounding without the round trip).
// Traffic: two reads and one write of the tensor (PyTorch: the norm's two reads and one write,
// then the activation's read and write).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ct3d_epilogue.cuh"
#include "ct3d_launch.h"
#include "ct3d_params.h"
#include "ct3d_pass_lite.cuh"

namespace ct3d {
namespace {

constexpr int kNormWarps = kNormThreads / 32;

// Vectors per thread and elements per CTA of T (as norm_vecs_per_thread / norm_chunk).
template <typename T>
constexpr int norm_vpt() {
  return norm_vecs_per_thread(std::is_same<T, float>::value ? kF32 : kBF16);
}
template <typename T>
constexpr int64_t norm_chunk_of() {
  return int64_t{kNormThreads} * norm_vpt<T>() * kLiteE;
}
constexpr int kFinalizeWarps = 8;  // (n, group) pairs per CTA of the finalize kernel

// (n, mean, m2) <- the merge of itself and (nb, mb, m2b) (Chan et al.'s pairwise rule).
template <typename F>
__device__ __forceinline__ void norm_merge(F& n, F& mean, F& m2, F nb, F mb, F m2b) {
  if (nb == F(0)) return;
  const F nt = n + nb;
  const F d = mb - mean;
  const F f = nb / nt;
  mean += d * f;
  m2 += m2b + d * d * n * f;
  n = nt;
}

template <typename F>
__device__ __forceinline__ void norm_warp_merge(F& n, F& mean, F& m2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const F nb = __shfl_xor_sync(0xffffffffu, n, off);
    const F mb = __shfl_xor_sync(0xffffffffu, mean, off);
    const F qb = __shfl_xor_sync(0xffffffffu, m2, off);
    norm_merge(n, mean, m2, nb, mb, qb);
  }
}

// One 8-element vector as loaded: the elements' bits, two 16-bit elements per word for
// float16 / bfloat16 (4 registers per vector rather than 8 floats, so that eight vectors stay
// in flight without spilling).
template <typename T>
struct NormRaw {
  uint32_t w[sizeof(T) * kLiteE / 4];
};

template <typename T>
__device__ __forceinline__ uint32_t norm_bits(T v) {
  if constexpr (std::is_same<T, float>::value) {
    return __float_as_uint(v);
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half_as_ushort(v);
  } else {
    return __bfloat16_as_ushort(v);
  }
}

// Where this thread's vector j of the chunk at `base` starts, and the distance between its
// elements (norm_step). VEC (S % 8 == 0, 16-byte aligned rows): 8 consecutive elements, one
// 16-byte access (two for float32) per vector. Otherwise (rows not 16-byte aligned, e.g. l2_60's
// S = 31 x 63 x 63) the vectors are strided: element k of thread t's vector j is base +
// j * kNormThreads * 8 + k * kNormThreads + t, so that a warp's scalar load or store of element
// k covers 32 consecutive elements. With consecutive elements per thread there, lanes 32 bytes
// apart, each scalar access of a warp touched 32 sectors and each store wrote 32 partial
// sectors. Both forms cover the chunk's kNormThreads * vectors * 8 elements once.
template <bool VEC>
constexpr int64_t norm_step() {
  return VEC ? 1 : kNormThreads;
}
template <bool VEC>
__device__ __forceinline__ int64_t norm_vec_start(int64_t base, int j) {
  return VEC ? base + (static_cast<int64_t>(j) * kNormThreads + threadIdx.x) * kLiteE
             : base + static_cast<int64_t>(j) * kNormThreads * kLiteE + threadIdx.x;
}

// The vector of this thread at element `start` of the row (elements start + k * norm_step,
// k < 8); `cnt` of them lie inside the row (0 .. 8, always the first ones), the others read
// as 0.
template <typename T, bool VEC>
__device__ __forceinline__ void norm_load(const T* row, int64_t start, int64_t S, NormRaw<T>& r,
                                          int& cnt) {
  constexpr int64_t kStep = norm_step<VEC>();
  const int64_t left = S - start;  // k < cnt  <=>  start + k * kStep < S
  cnt = left <= 0                           ? 0
        : left > kStep * (kLiteE - 1)       ? kLiteE
                                            : static_cast<int>((left + kStep - 1) / kStep);
  if (VEC && cnt == kLiteE) {
    const uint4* q = reinterpret_cast<const uint4*>(row + start);
#pragma unroll
    for (int h = 0; h < static_cast<int>(sizeof(T)) / 2; ++h) {
      const uint4 u = q[h];
      r.w[4 * h] = u.x;
      r.w[4 * h + 1] = u.y;
      r.w[4 * h + 2] = u.z;
      r.w[4 * h + 3] = u.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kLiteE; ++k) {
      const uint32_t b = k < cnt ? norm_bits<T>(row[start + k * kStep]) : 0u;
      if constexpr (sizeof(T) == 4) {
        r.w[k] = b;
      } else if (k & 1) {
        r.w[k >> 1] |= b << 16;
      } else {
        r.w[k >> 1] = b;
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void norm_unpack(const NormRaw<T>& r, float (&v)[kLiteE]) {
#pragma unroll
  for (int k = 0; k < kLiteE; ++k) {
    if constexpr (sizeof(T) == 4) {
      v[k] = __uint_as_float(r.w[k]);
    } else {
      v[k] = half_bits_to_float<T>((k & 1) ? r.w[k >> 1] >> 16 : r.w[k >> 1] & 0xffffu);
    }
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kNormThreads)
    norm_stats_kernel(const NormTailParams p) {
  constexpr int kVpt = norm_vpt<T>();
  const int64_t row = blockIdx.x / p.chunks;
  const int64_t chunk = blockIdx.x - row * p.chunks;
  const T* x = static_cast<const T*>(p.x) + row * p.S;
  const int64_t base = chunk * norm_chunk_of<T>();
  NormRaw<T> raw[kVpt];
  int cnt[kVpt];
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {  // all loads in flight before any arithmetic
    norm_load<T, VEC>(x, norm_vec_start<VEC>(base, j), p.S, raw[j], cnt[j]);
  }
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    if (cnt[j] == 0) continue;
    float v[kLiteE];
    norm_unpack<T>(raw[j], v);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kLiteE; ++k) s += v[k];  // the padding is 0
    float q = 0.0f;
    if (cnt[j] == kLiteE) {  // a whole vector (all but a row's last): no masks
      const float mb = s * (1.0f / kLiteE);
#pragma unroll
      for (int k = 0; k < kLiteE; ++k) {
        const float d = v[k] - mb;
        q = fmaf(d, d, q);
      }
      norm_merge(n, mean, m2, static_cast<float>(kLiteE), mb, q);
    } else {
      const float nb = static_cast<float>(cnt[j]);
      const float mb = s / nb;
#pragma unroll
      for (int k = 0; k < kLiteE; ++k) {
        const float d = v[k] - mb;
        q += k < cnt[j] ? d * d : 0.0f;
      }
      norm_merge(n, mean, m2, nb, mb, q);
    }
  }
  norm_warp_merge(n, mean, m2);
  __shared__ float sh[3][kNormWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sh[0][warp] = n;
    sh[1][warp] = mean;
    sh[2][warp] = m2;
  }
  __syncthreads();
  if (warp == 0) {
    n = lane < kNormWarps ? sh[0][lane] : 0.0f;
    mean = lane < kNormWarps ? sh[1][lane] : 0.0f;
    m2 = lane < kNormWarps ? sh[2][lane] : 0.0f;
    norm_warp_merge(n, mean, m2);
    if (lane == 0) {
      float* out = p.partial + static_cast<int64_t>(blockIdx.x) * 3;
      out[0] = n;
      out[1] = mean;
      out[2] = m2;
    }
  }
}

__global__ void __launch_bounds__(kFinalizeWarps * 32)
    norm_finalize_kernel(const NormTailParams p, int64_t n_groups) {
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (grp >= n_groups) return;  // the whole warp leaves
  const int64_t cg = p.C / p.groups;
  const int64_t n_idx = grp / p.groups, g = grp - n_idx * p.groups;
  const int64_t first = (n_idx * p.C + g * cg) * p.chunks;
  const int64_t count = cg * p.chunks;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int64_t i = lane; i < count; i += 32) {
    const float* q = p.partial + (first + i) * 3;
    norm_merge<double>(n, mean, m2, q[0], q[1], q[2]);
  }
  norm_warp_merge(n, mean, m2);
  if (lane == 0) {
    const double var = n > 0.0 ? m2 / n : 0.0;
    p.stats[grp * 2] = static_cast<float>(mean);
    p.stats[grp * 2 + 1] = rsqrtf(static_cast<float>(var > 0.0 ? var : 0.0) + p.eps);
  }
}

// The activation after the norm, a template argument of the apply kernel. With the opcode read
// at run time (v28), every one of a thread's 32 (float32) or 64 (16-bit) unrolled elements
// carried the switch over all seven activations: the bfloat16 apply kernel was 200 KB of SASS
// (16.5 KB without an activation), larger than the instruction caches, which is the suspect for
// v28's bf16 Hardswish and LeakyReLU losing when the elements per thread doubled. Each instance
// now holds its own activation's code only.
enum NormAct : int {
  kNaNone = 0,
  kNaRelu,
  kNaLeakyRelu,
  kNaGeluErf,
  kNaGeluTanh,
  kNaSilu,
  kNaSigmoid,
  kNaTanh,
  kNaHardswish
};

// NormTailParams.act / act_flag -> NormAct; -1 for an opcode the tail does not take.
__host__ __device__ constexpr int norm_act_code(int act, int flag) {
  return act == 0               ? kNaNone
         : act == OP_RELU       ? kNaRelu
         : act == OP_LEAKY_RELU ? kNaLeakyRelu
         : act == OP_GELU       ? (flag ? kNaGeluTanh : kNaGeluErf)
         : act == OP_SILU       ? kNaSilu
         : act == OP_SIGMOID    ? kNaSigmoid
         : act == OP_TANH       ? kNaTanh
         : act == OP_HARDSWISH  ? kNaHardswish
                                : -1;
}

template <int A>
__device__ __forceinline__ float norm_act(float x, float alpha) {
  if constexpr (A == kNaRelu) {
    return op_relu(x);
  } else if constexpr (A == kNaLeakyRelu) {
    return op_leaky_relu(x, alpha);
  } else if constexpr (A == kNaGeluErf) {
    return op_gelu_erf(x);
  } else if constexpr (A == kNaGeluTanh) {
    return op_gelu_tanh(x);
  } else if constexpr (A == kNaSilu) {
    return op_silu(x);
  } else if constexpr (A == kNaSigmoid) {
    return op_sigmoid(x);
  } else if constexpr (A == kNaTanh) {
    return tanhf(x);
  } else if constexpr (A == kNaHardswish) {
    return op_hardswish(x);
  } else {
    return x;
  }
}

// A: a NormAct; kNaNone stores a * x + b rounded once, as the round trip would.
// At most 168 registers (launched with kNormThreads threads): with the activation known at
// compile time and only __launch_bounds__(kNormThreads), ptxas took all 255 registers for the
// 16-bit Hardswish (its 64 elements' divisions interleaved) and still spilled; under this cap
// no instance spills and all use at most 94 registers except the 16-bit GELUs of the strided
// form, 152-157 (nvcc 13.0, sm_80 / sm_90a; a cap of 128 made those spill). The two qualifiers
// cannot be combined.
template <typename T, bool VEC, int A>
__global__ void __maxnreg__(168)
    norm_apply_kernel(const NormTailParams p) {
  constexpr int kVpt = norm_vpt<T>();
  const int64_t row = blockIdx.x / p.chunks;
  const int64_t chunk = blockIdx.x - row * p.chunks;
  const int64_t n_idx = row / p.C;
  const int c = static_cast<int>(row - n_idx * p.C);
  const int64_t grp = n_idx * p.groups + c / (p.C / p.groups);
  const float mean = p.stats[grp * 2], rstd = p.stats[grp * 2 + 1];
  const float a = p.weight != nullptr ? rstd * p.weight[c] : rstd;
  const float b = (p.bias != nullptr ? p.bias[c] : 0.0f) - a * mean;
  const T* x = static_cast<const T*>(p.x) + row * p.S;
  T* out = static_cast<T*>(p.out) + row * p.S;
  const int64_t base = chunk * norm_chunk_of<T>();
  NormRaw<T> raw[kVpt];
  int cnt[kVpt];
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    norm_load<T, VEC>(x, norm_vec_start<VEC>(base, j), p.S, raw[j], cnt[j]);
  }
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    const int64_t start = norm_vec_start<VEC>(base, j);
    float v[kLiteE];
    norm_unpack<T>(raw[j], v);
#pragma unroll
    for (int k = 0; k < kLiteE; ++k) {
      const float y = fmaf(v[k], a, b);
      if constexpr (A != kNaNone) {
        v[k] = norm_act<A>(elem_to_float<T>(elem_from_float<T>(y)), p.alpha);
      } else {
        v[k] = y;
      }
    }
    if (VEC && cnt[j] == kLiteE) {
      lite_store8<T>(out + start, v);
    } else {
#pragma unroll
      for (int k = 0; k < kLiteE; ++k) {
        if (k < cnt[j]) out[start + k * norm_step<VEC>()] = elem_from_float<T>(v[k]);
      }
    }
  }
}

// The apply kernel of an activation (a NormAct; kNaNone for any other value).
using NormKernel = void (*)(NormTailParams);
template <typename T, bool VEC>
NormKernel norm_apply_for(int code) {
  switch (code) {
    case kNaRelu: return norm_apply_kernel<T, VEC, kNaRelu>;
    case kNaLeakyRelu: return norm_apply_kernel<T, VEC, kNaLeakyRelu>;
    case kNaGeluErf: return norm_apply_kernel<T, VEC, kNaGeluErf>;
    case kNaGeluTanh: return norm_apply_kernel<T, VEC, kNaGeluTanh>;
    case kNaSilu: return norm_apply_kernel<T, VEC, kNaSilu>;
    case kNaSigmoid: return norm_apply_kernel<T, VEC, kNaSigmoid>;
    case kNaTanh: return norm_apply_kernel<T, VEC, kNaTanh>;
    case kNaHardswish: return norm_apply_kernel<T, VEC, kNaHardswish>;
    default: return norm_apply_kernel<T, VEC, kNaNone>;
  }
}

template <typename T>
cudaError_t launch_typed(const NormTailParams& p, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(p.rows * p.chunks);
  const int64_t n_groups = p.rows / p.C * p.groups;
  const unsigned fgrid = static_cast<unsigned>((n_groups + kFinalizeWarps - 1) / kFinalizeWarps);
  if (p.vec) {
    norm_stats_kernel<T, true><<<grid, kNormThreads, 0, stream>>>(p);
  } else {
    norm_stats_kernel<T, false><<<grid, kNormThreads, 0, stream>>>(p);
  }
  norm_finalize_kernel<<<fgrid, kFinalizeWarps * 32, 0, stream>>>(p, n_groups);
  const int code = norm_act_code(p.act, p.act_flag);
  const NormKernel apply = p.vec ? norm_apply_for<T, true>(code) : norm_apply_for<T, false>(code);
  apply<<<grid, kNormThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_norm_tail(const NormTailParams& p, cudaStream_t stream) {
  if (p.C <= 0 || p.groups <= 0 || p.C % p.groups != 0 || p.rows <= 0 || p.rows % p.C != 0 ||
      p.S <= 0 || p.chunks != (p.S + norm_chunk(p.dtype) - 1) / norm_chunk(p.dtype) ||
      p.rows * p.chunks >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  if (norm_act_code(p.act, p.act_flag) < 0) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case kF32: return launch_typed<float>(p, stream);
    case kF16: return launch_typed<__half>(p, stream);
    case kBF16: return launch_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ct3d
