// The epilogue pass's vector kernels ("lite"): the bias and an elementwise program over a conv
// output, 8 elements per thread step, the program run in registers. No torch header.
//
// Why: the staged pass kernel (kernels_epilogue_pass.cu) runs the program through the
// shared-memory tile interpreter (run_program, 128 registers, 16 warps per multiprocessor) and
// spent 33 thread instructions per element on a bf16 copy and ~95 on l2_100's float32
// channels_last_3d -> NCDHW clamp / div (Nsight Compute, docs/kernel.md): instruction-bound at
// about half of HBM bandwidth. Here each thread loads 8 elements along the fast dimension
// with 16-byte loads and runs the program on them in registers, in two forms:
//   * same layout (source and output both NCDHW or both channels_last_3d; in place allowed):
//     no shared memory, one 8-element vector per thread and step, stored as 16-byte vectors;
//   * channels_last_3d -> NCDHW: a tile of 32 channels x 128 positions is read as 8-channel
//     vectors into shared memory (as float; 16 KB), then read back per channel: as 8-position
//     runs stored as 16-byte vectors (VEC_OUT), or as 16 lanes x 8 elements 16 positions apart
//     stored one element per lane. Shared-memory rows are 32 floats; the float4 chunk q of row
//     s sits at chunk q ^ g(s), g(s) = (s & 3) | (bit 3 of s) << 2, so the write (8 lanes: two
//     rows x four 8-channel vectors) and the VEC_OUT read (a warp: 16 channels x two 8-position
//     runs) touch 32 distinct banks per phase (the scalar-store read: 2-way conflicts).
// What the program may hold (lite_program_ok, host side): at most two registers, elementwise
// opcodes only, and slots that are per-channel or laid out like the output (like_y). Anything
// else, and tensors whose fast extent, strides or pointers do not allow these vectors, take
// the staged or plain kernel (the binding decides: EpiPassParams.lite).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "ct3d_epilogue.cuh"
#include "ct3d_params.h"

namespace ct3d {

constexpr int kLiteThreads = 256;
constexpr int kLiteTS = 128;  // positions per transpose tile
constexpr int kLiteTC = 32;   // channels per transpose tile

// Whether the lite kernels run this program: <= 2 registers, elementwise opcodes, and every
// tensor operand per-channel or laid out like the output.
inline bool lite_program_ok(const Epilogue& E) {
  if (E.n_regs > 2 || E.out_reg < 0 || E.out_reg > 1) return false;
  auto chan = [&](int i) { return i >= 0 && i < E.n_slots && slot_per_channel(E.slot[i]); };
  for (int k = 0; k < E.n_instr; ++k) {
    const Instr& I = E.ins[k];
    if (I.d < 0 || I.d > 1 || I.a > 1 || I.b > 1) return false;
    switch (I.op) {
      case OP_LOAD_TENSOR:
        if (I.c < 0 || I.c >= E.n_slots) return false;
        if (!chan(I.c) && E.slot[I.c].like_y == 0) return false;
        break;
      case OP_PRELU:
        if (!chan(I.c)) return false;
        break;
      case OP_BATCH_NORM:
        if (!chan(I.c) || !chan(I.c + 1) || (I.b && (!chan(I.c + 2) || !chan(I.c + 3))))
          return false;
        break;
      case OP_LOAD_SCALAR: case OP_ADD: case OP_SUB: case OP_MUL: case OP_DIV: case OP_NEG:
      case OP_ABS: case OP_SQUARE: case OP_RELU: case OP_LEAKY_RELU: case OP_ELU: case OP_CELU:
      case OP_SELU: case OP_GELU: case OP_SILU: case OP_MISH: case OP_HARDSWISH:
      case OP_HARDSIGMOID: case OP_HARDTANH: case OP_SIGMOID: case OP_TANH: case OP_SOFTPLUS:
      case OP_CLAMP:
        break;
      default:
        return false;
    }
  }
  return true;
}

// 8 consecutive elements of T at ptr (16-byte aligned) -> float.
template <typename T>
__device__ __forceinline__ void lite_load8(const T* ptr, float (&v)[kLiteE]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(ptr)[0];
    const float4 b = reinterpret_cast<const float4*>(ptr)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(ptr);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = half_bits_to_float<T>(w[k] & 0xffffu);
      v[2 * k + 1] = half_bits_to_float<T>(w[k] >> 16);
    }
  }
}

// float -> 8 consecutive elements of T at ptr (16-byte aligned), rounded to nearest even.
template <typename T>
__device__ __forceinline__ void lite_store8(T* ptr, const float (&v)[kLiteE]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(ptr)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(ptr)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = float_to_half_bits<T>(v[2 * k]) |
                                       (float_to_half_bits<T>(v[2 * k + 1]) << 16);
    *reinterpret_cast<uint4*>(ptr) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// 8 consecutive elements of a slot laid out like the output, from element offset off.
__device__ __forceinline__ void lite_load_slot8(const Slot& s, int64_t off, float (&v)[kLiteE]) {
  const bool al16 = ((reinterpret_cast<uintptr_t>(s.ptr) +
                      static_cast<uintptr_t>(off) * (s.dtype == kF32 ? 4u : 2u)) & 15u) == 0;
  if (s.dtype == kF32 && al16) {
    lite_load8(static_cast<const float*>(s.ptr) + off, v);
  } else if (s.dtype == kBF16 && al16) {
    lite_load8(static_cast<const __nv_bfloat16*>(s.ptr) + off, v);
  } else if (s.dtype == kF16 && al16) {
    lite_load8(static_cast<const __half*>(s.ptr) + off, v);
  } else {
#pragma unroll
    for (int j = 0; j < kLiteE; ++j) v[j] = load_as_float(s.ptr, off + j, s.dtype);
  }
}

// Value of a per-channel slot (or the bias) at channel c.
__device__ __forceinline__ float lite_chan(const Slot& s, int c) {
  return load_as_float(s.ptr, static_cast<int64_t>(c) * s.s[1], s.dtype);
}

// The program (lite_program_ok) on 8 elements in r0 (conv output + bias): element j has channel
// c + j * CSTEP and output offset yoff + j * YSTEP; with YSTEP > 1 only the first `nvalid`
// elements are inside the output (the others' slot operands are not read). The result is
// left in r0. Same arithmetic as run_program (ct3d_epilogue.cuh), through the same op_*
// functions.
template <int CSTEP, int YSTEP = 1>
__device__ __forceinline__ void lite_program(const Epilogue& E, float (&r0)[kLiteE], int c,
                                             int64_t yoff, int nvalid = kLiteE) {
  float r1[kLiteE];
#pragma unroll
  for (int j = 0; j < kLiteE; ++j) r1[j] = 0.0f;
  const int count = E.n_instr;
#pragma unroll 1
  for (int k = 0; k < count; ++k) {
    const Instr I = E.ins[k];
    const float f0 = I.f0, f1 = I.f1;
    float x[kLiteE], y[kLiteE], res[kLiteE];
#pragma unroll
    for (int j = 0; j < kLiteE; ++j) {
      x[j] = I.a < 0 ? f0 : (I.a == 1 ? r1[j] : r0[j]);
      y[j] = I.b < 0 ? f1 : (I.b == 1 ? r1[j] : r0[j]);
    }
#define CT3D_LITE(...)                          \
  _Pragma("unroll") for (int j = 0; j < kLiteE; ++j) { \
    const float xv = x[j], yv = y[j];          \
    (void)xv;                                  \
    (void)yv;                                  \
    res[j] = (__VA_ARGS__);                    \
  }
    switch (I.op) {
      case OP_LOAD_SCALAR:
        CT3D_LITE(f0);
        break;
      case OP_LOAD_TENSOR: {
        const Slot& s = E.slot[I.c];
        if (s.like_y && YSTEP == 1) {
          lite_load_slot8(s, yoff, res);
        } else if (s.like_y) {
#pragma unroll
          for (int j = 0; j < kLiteE; ++j)
            res[j] = j < nvalid ? load_as_float(s.ptr, yoff + j * YSTEP, s.dtype) : 0.0f;
        } else {
#pragma unroll
          for (int j = 0; j < kLiteE; ++j) res[j] = lite_chan(s, c + j * CSTEP);
        }
        break;
      }
      case OP_ADD: CT3D_LITE(xv + yv); break;
      case OP_SUB: CT3D_LITE(xv - yv); break;
      case OP_MUL: CT3D_LITE(xv * yv); break;
      case OP_DIV:
        if (I.b < 0) {  // a scalar divisor: times its reciprocal, as run_program
          const float inv = __fdiv_rn(1.0f, f1);
          CT3D_LITE(xv * inv);
        } else {
          CT3D_LITE(xv / yv);
        }
        break;
      case OP_NEG: CT3D_LITE(-xv); break;
      case OP_ABS: CT3D_LITE(fabsf(xv)); break;
      case OP_SQUARE: CT3D_LITE(xv * xv); break;
      case OP_RELU: CT3D_LITE(op_relu(xv)); break;
      case OP_LEAKY_RELU: CT3D_LITE(op_leaky_relu(xv, f0)); break;
      case OP_PRELU: {
        const Slot& s = E.slot[I.c];
#pragma unroll
        for (int j = 0; j < kLiteE; ++j) res[j] = op_prelu(x[j], lite_chan(s, c + j * CSTEP));
        break;
      }
      case OP_ELU: CT3D_LITE(op_elu(xv, f0)); break;
      case OP_CELU: CT3D_LITE(op_celu(xv, f0)); break;
      case OP_SELU: CT3D_LITE(op_selu(xv)); break;
      case OP_GELU:
        if (I.b) {
          CT3D_LITE(op_gelu_tanh(xv));
        } else {
          CT3D_LITE(op_gelu_erf(xv));
        }
        break;
      case OP_SILU: CT3D_LITE(op_silu(xv)); break;
      case OP_MISH: CT3D_LITE(op_mish(xv)); break;
      case OP_HARDSWISH: CT3D_LITE(op_hardswish(xv)); break;
      case OP_HARDSIGMOID: CT3D_LITE(op_hardsigmoid(xv)); break;
      case OP_HARDTANH: CT3D_LITE(op_hardtanh(xv, f0, f1)); break;
      case OP_SIGMOID: CT3D_LITE(op_sigmoid(xv)); break;
      case OP_TANH: CT3D_LITE(tanhf(xv)); break;
      case OP_SOFTPLUS: CT3D_LITE(op_softplus(xv, f0, f1)); break;
      case OP_CLAMP: CT3D_LITE(clamp_keep_nan(xv, f0, f1)); break;
      case OP_BATCH_NORM: {
        const Slot &sm = E.slot[I.c], &sv = E.slot[I.c + 1];
#pragma unroll
        for (int j = 0; j < kLiteE; ++j) {
          const int cj = c + j * CSTEP;
          const float wt = I.b ? lite_chan(E.slot[I.c + 2], cj) : 1.0f;
          const float bs = I.b ? lite_chan(E.slot[I.c + 3], cj) : 0.0f;
          res[j] = op_batch_norm(x[j], lite_chan(sm, cj), lite_chan(sv, cj), wt, bs, f0, I.b);
        }
        break;
      }
      default:  // lite_program_ok lets no other opcode through: poison, not garbage
        CT3D_LITE(__int_as_float(0x7fc00000));
        break;
    }
#undef CT3D_LITE
#pragma unroll
    for (int j = 0; j < kLiteE; ++j) {
      r0[j] = I.d == 0 ? res[j] : r0[j];
      r1[j] = I.d == 1 ? res[j] : r1[j];
    }
  }
  if (E.out_reg == 1) {
#pragma unroll
    for (int j = 0; j < kLiteE; ++j) r0[j] = r1[j];
  }
}

// r[j] += bias of element j's channel (c + j * CSTEP).
template <int CSTEP>
__device__ __forceinline__ void lite_add_bias(const EpiPassParams& p, float (&r)[kLiteE],
                                              int c) {
  if (p.bias == nullptr) return;
#pragma unroll
  for (int j = 0; j < kLiteE; ++j) r[j] += load_as_float(p.bias, c + j * CSTEP, p.bias_dtype);
}

// Same layout: source and output both NCDHW (CFAST false: a vector is 8 positions of one
// channel) or both channels_last_3d (CFAST true: 8 channels of one position). Grid: x over the
// vectors of a sample (grid-stride), y over samples (grid-stride). The binding guarantees
// C * S / 8 < 2^31 and 16-byte vectors (kLiteSame).
template <typename TS, typename TO, bool CFAST>
__global__ void __launch_bounds__(kLiteThreads, 3)
    epilogue_pass_lite_kernel(const __grid_constant__ EpiPassParams p) {
  const uint32_t inner = static_cast<uint32_t>(CFAST ? p.C : p.S) / kLiteE;
  const uint32_t per_sample = inner * static_cast<uint32_t>(CFAST ? p.S : p.C);
  const TS* __restrict__ src = static_cast<const TS*>(p.src);
  TO* __restrict__ out = static_cast<TO*>(p.out);
  for (int n = blockIdx.y; n < p.N; n += gridDim.y) {
    for (uint32_t v = blockIdx.x * kLiteThreads + threadIdx.x; v < per_sample;
         v += gridDim.x * kLiteThreads) {
      const uint32_t o = v / inner, i = (v - o * inner) * kLiteE;
      const int c = static_cast<int>(CFAST ? i : o);
      const int64_t s = CFAST ? o : i;
      float r[kLiteE];
      lite_load8(src + n * p.ss_n + c * p.ss_c + s * p.ss_s, r);
      lite_add_bias<CFAST ? 1 : 0>(p, r, c);
      const int64_t yoff = n * p.os_n + c * p.os_c + s * p.os_s;
      lite_program<CFAST ? 1 : 0>(p.epi, r, c, yoff);
      lite_store8(out + yoff, r);
    }
  }
}

// The chunk swizzle of row s of the transpose tile (see the top of the file).
__device__ __forceinline__ int lite_swz(int s) { return (s & 3) | (((s >> 3) & 1) << 2); }

// channels_last_3d source -> NCDHW output. Grid: x = N * ceil(S / 128) tiles of positions, y =
// ceil(C / 32) channel blocks (binding: C % 8 == 0 and 16-byte source vectors). VEC_OUT
// (S % 8 == 0, 16-byte output vectors): a thread stores 8 consecutive positions of a channel
// as one or two 16-byte stores; otherwise (an odd S, l2_100's 47 x 95 x 95) the 16 lanes of a
// half-warp store 16 consecutive positions of one channel, one element each, 8 times (positions
// p, p + 16, ..., each thread's elements 16 apart; 2-way bank conflicts on the tile reads).
template <typename TS, typename TO, bool VEC_OUT>
__global__ void __launch_bounds__(kLiteThreads)
    epilogue_pass_lite_t_kernel(const __grid_constant__ EpiPassParams p) {
  __align__(16) __shared__ float tile[kLiteTS * kLiteTC];
  const int tid = threadIdx.x;
  const int tiles_s = static_cast<int>((p.S + kLiteTS - 1) / kLiteTS);
  const int n = static_cast<int>(blockIdx.x) / tiles_s;
  const int s0 = (static_cast<int>(blockIdx.x) - n * tiles_s) * kLiteTS;
  const int c0 = static_cast<int>(blockIdx.y) * kLiteTC;
  const int S = static_cast<int>(p.S);
  constexpr int kVecs = kLiteTS * kLiteTC / kLiteE;  // 512 vectors in each phase
  const TS* __restrict__ src = static_cast<const TS*>(p.src) + n * p.ss_n;
  // phase 1: 8-channel vectors of the source -> rows of the tile
  float v[kVecs / kLiteThreads][kLiteE];
#pragma unroll
  for (int t = 0; t < kVecs / kLiteThreads; ++t) {
    const int u = tid + t * kLiteThreads;
    const int sl = u >> 2, q = u & 3;
    if (s0 + sl < S && c0 + q * kLiteE < p.C) {
      lite_load8(src + (s0 + sl) * p.ss_s + c0 + q * kLiteE, v[t]);
    } else {
#pragma unroll
      for (int j = 0; j < kLiteE; ++j) v[t][j] = 0.0f;
    }
  }
#pragma unroll
  for (int t = 0; t < kVecs / kLiteThreads; ++t) {
    const int u = tid + t * kLiteThreads;
    const int sl = u >> 2, q = u & 3, g = lite_swz(sl);
    float4* row = reinterpret_cast<float4*>(tile + sl * kLiteTC);
    row[(2 * q) ^ g] = make_float4(v[t][0], v[t][1], v[t][2], v[t][3]);
    row[(2 * q + 1) ^ g] = make_float4(v[t][4], v[t][5], v[t][6], v[t][7]);
  }
  __syncthreads();
  // phase 2: 8 positions of one channel -> program -> the NCDHW output
  TO* __restrict__ out = static_cast<TO*>(p.out);
  if constexpr (!VEC_OUT) {
#pragma unroll 1
    for (int t = 0; t < kVecs / kLiteThreads; ++t) {
      const int u = tid + t * kLiteThreads;
      const int p16 = u & 15, cl = u >> 4;
      const int c = c0 + cl, s = s0 + p16;
      if (c >= p.C || s >= S) continue;
      const int left = (S - s + 15) / 16;  // elements at positions s + 16 j < S
      const int nvalid = left < kLiteE ? left : kLiteE;
      const int g = lite_swz(p16);  // bits 0..3 of s0 + p16 + 16 j are those of p16
      const float* base = tile + p16 * kLiteTC + ((((cl >> 2) ^ g) << 2) | (cl & 3));
      float r[kLiteE];
#pragma unroll
      for (int k = 0; k < kLiteE; ++k) r[k] = base[k * 16 * kLiteTC];
      lite_add_bias<0>(p, r, c);
      const int64_t yoff = n * p.os_n + c * p.os_c + s;
      lite_program<0, 16>(p.epi, r, c, yoff, nvalid);
#pragma unroll
      for (int k = 0; k < kLiteE; ++k)
        if (k < nvalid) out[yoff + 16 * k] = elem_from_float<TO>(r[k]);
    }
  } else {
#pragma unroll 1
    for (int t = 0; t < kVecs / kLiteThreads; ++t) {
      const int u = tid + t * kLiteThreads;
      const int cl = (u & 15) + 16 * ((u >> 5) & 1);
      const int vl = ((u >> 4) & 1) + 2 * (u >> 6);
      const int c = c0 + cl, s = s0 + vl * kLiteE;
      if (c >= p.C || s >= S) continue;
      const int chunk = (cl >> 2) ^ ((vl & 1) << 2);
      const float* base = tile + vl * kLiteE * kLiteTC + (cl & 3);
      float r[kLiteE];
#pragma unroll
      for (int k = 0; k < kLiteE; ++k) r[k] = base[k * kLiteTC + ((chunk ^ (k & 3)) << 2)];
      lite_add_bias<0>(p, r, c);
      const int64_t yoff = n * p.os_n + c * p.os_c + s;
      lite_program<0>(p.epi, r, c, yoff);
      lite_store8(out + yoff, r);
    }
  }
}

}  // namespace ct3d
