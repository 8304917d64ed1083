// Fused ConvTranspose3d + elementwise epilogue: one kernel, output written once. No torch header.
//
// Gather form: every output element is accumulated by exactly one thread (no atomics, so the
// result is deterministic). For stride s, output index o = rho + s*t splits each spatial
// dimension into s phases rho; within a phase only the kernel taps k with
// k*dilation == (rho + padding) (mod s) touch the output, and the input index is t + off(k)
// with off(k) = (rho + padding - k*dilation) / s exact. So each phase is a dense implicit GEMM
//   M = N * T_d * T_h * T_w output voxels of the phase,
//   N = C_out / groups output channels (one group per CTA column),
//   K = taps of the phase x C_in / groups,
// and no multiply is spent on the zeros a transposed convolution inserts.
//
// CTA: 128 threads, a BM x BN output tile (BM voxels, BN channels), K in steps of kBK = 16
// input channels of one tap, staged through shared memory with a register prefetch of the
// next step (two buffers, one barrier a step). Main-loop arithmetic per MODE:
//   kModeFfma        exact FP32 FFMA (float32 input)
//   kModeTensorCore  mma.sync m16n8k8 TF32 (float32 input, operands rounded with cvt.rna)
//                    or m16n8k16 FP16/BF16 (half inputs); FP32 accumulation always.
// The FFMA path computes exactly the accumulator fragments the mma path owns, so both share
// the epilogue: fragments -> shared-memory tile -> bias + program per element -> one store.
//
// Grid: x = M tiles x phases, phase fastest, so the CTAs of all phases of one region run
// together and the stride-interleaved partial writes of one 32-byte sector meet in L2 before
// it is written back; y = groups * C_out tiles.
//
// Epilogue: the accumulators (plus bias) go to a shared-memory tile, "register" 0 of a small
// register file of tiles; the decoded program (ct3d_epilogue.cuh) runs instruction by
// instruction over the tile; each output element is then stored once, lanes walking the
// output's contiguous dimension.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <climits>
#include <type_traits>

#include "ct3d_epilogue.cuh"
#include "ct3d_params.h"

namespace ct3d {

constexpr int kThreads = 128;
constexpr int kBK = 16;

// ---------------------------------------------------------------------------------------
// Phase geometry of one spatial dimension.
struct PhaseDim {
  int T;      // outputs of this phase: o = rho + s*t, t in [0, T)
  int k0;     // first tap of the phase (-1: none)
  int nT;     // taps of the phase: k = k0 + j*kstep, j in [0, nT)
  int kstep;  // s / gcd(s, dilation)
  int off0;   // input index = t + off0 - j*doff
  int doff;   // dilation / gcd(s, dilation)
};

__host__ __device__ __forceinline__ int gcd_int(int a, int b) {
  while (b) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a;
}

__host__ __device__ __forceinline__ PhaseDim phase_dim(int rho, int out, int s, int pad, int dil,
                                                       int ksize) {
  PhaseDim r;
  r.T = rho < out ? (out - rho + s - 1) / s : 0;
  const int want = (rho + pad) % s;  // taps with k*dil == want (mod s)
  const int g = gcd_int(s, dil);
  r.kstep = s / g;
  r.doff = dil / g;
  r.k0 = -1;
  const int lim = ksize < r.kstep ? ksize : r.kstep;
  for (int k = 0; k < lim; ++k) {
    if ((k * dil) % s == want) {
      r.k0 = k;
      break;
    }
  }
  if (r.k0 < 0) {
    r.nT = 0;
    r.off0 = 0;
  } else {
    r.nT = (ksize - 1 - r.k0) / r.kstep + 1;
    r.off0 = (rho + pad - r.k0 * dil) / s;  // exact: the numerator is a multiple of s
  }
  return r;
}

// Walks the K steps of a phase in order: input-channel chunk fastest, then w, h, d taps.
struct KIter {
  int chunk, jw, jh, jd;
  __device__ __forceinline__ void next(int n_chunks, int ntw, int nth) {
    if (++chunk == n_chunks) {
      chunk = 0;
      if (++jw == ntw) {
        jw = 0;
        if (++jh == nth) {
          jh = 0;
          ++jd;
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Tensor-core helpers.
__device__ __forceinline__ uint32_t f32_to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int IN_DT>
__device__ __forceinline__ void mma_16(float (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  if (IN_DT == kF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Stores N elements of a register array to shared memory with the widest aligned vectors.
template <typename T, int N>
__device__ __forceinline__ void store_row(T* dst, const T (&src)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < N; i += kPer) {
      uint4 v;
      memcpy(&v, &src[i], 16);
      *reinterpret_cast<uint4*>(dst + i) = v;
    }
  } else if constexpr (kBytes % 8 == 0) {
    constexpr int kPer = 8 / sizeof(T);
#pragma unroll
    for (int i = 0; i < N; i += kPer) {
      uint2 v;
      memcpy(&v, &src[i], 8);
      *reinterpret_cast<uint2*>(dst + i) = v;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// ---------------------------------------------------------------------------------------
// Tile configuration.
template <int IN_DT, int MODE, int BM, int BN, int WARPS_M, int WARPS_N>
struct Tile {
  static_assert(IN_DT == kF32 || MODE == kModeTensorCore, "half inputs use tensor cores");
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "4 warps");
  static constexpr bool kHalf = IN_DT != kF32;
  using GType = typename std::conditional<kHalf, uint16_t, float>::type;  // global element
  using SType = GType;                                                     // shared element
  static constexpr int LDK = kBK + (kHalf ? 8 : 4);  // row pitch: 16 bytes of padding
  static constexpr int LDC = BM + 4;                 // epilogue tile pitch (floats)
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
  static constexpr int MT = WTM / 16, NT = WTN / 8;
  static_assert(MT * 16 == WTM && NT * 8 == WTN, "warp tile must be a multiple of 16 x 8");
  // A loader: each thread loads A_MPT rows (output voxels) x A_KPT consecutive channels.
  static constexpr int A_TPM = BM >= kThreads ? 1 : kThreads / BM;
  static constexpr int A_MPT = BM >= kThreads ? BM / kThreads : 1;
  static constexpr int A_KPT = kBK / A_TPM;
  // B loader: each thread loads one output channel x B_KPT consecutive input channels.
  static constexpr int B_TPN = kThreads / BN;
  static constexpr int B_KPT = kBK / B_TPN;
  static_assert(B_KPT >= 1 && A_KPT >= 1, "tile too small");
  static constexpr int kABytes = BM * LDK * static_cast<int>(sizeof(SType));
  static constexpr int kBBytes = BN * LDK * static_cast<int>(sizeof(SType));
  static constexpr int kMainBytes = 2 * (kABytes + kBBytes);
  static constexpr int kTileFloats = BN * LDC;  // one epilogue register
  static constexpr int kTileBytes = kTileFloats * static_cast<int>(sizeof(float));
  // per output voxel of the tile: output offset (int64), then n, t_d, t_h, t_w (int)
  static constexpr int kInfoBytes = BM * static_cast<int>(sizeof(int64_t) + 4 * sizeof(int));
  static constexpr int kPer = BM * BN / kThreads;  // epilogue elements per thread
  // The main-loop buffers and the epilogue registers share the front of shared memory.
  static __host__ __device__ int union_bytes(int n_regs) {
    const int regs = n_regs * kTileBytes;
    return kMainBytes > regs ? kMainBytes : regs;
  }
  static __host__ __device__ int smem_bytes(int n_regs) { return union_bytes(n_regs) + kInfoBytes; }
};

// ---------------------------------------------------------------------------------------
template <int IN_DT, int MODE, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(kThreads, 2)
    conv_transpose3d_fused_kernel(const __grid_constant__ ConvParams p) {
  using Cfg = Tile<IN_DT, MODE, BM, BN, WARPS_M, WARPS_N>;
  using GType = typename Cfg::GType;
  using SType = typename Cfg::SType;
  constexpr int LDK = Cfg::LDK;
  constexpr int MT = Cfg::MT, NT = Cfg::NT;

  // ---- phase, tile position ----
  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];
  const int n_phase = sd * sh * sw;
  const int z = static_cast<int>(blockIdx.x % static_cast<unsigned>(n_phase));
  const int rw = z % sw, rh = (z / sw) % sh, rd = z / (sw * sh);
  const int Td = rd < p.Do ? (p.Do - rd + sd - 1) / sd : 0;
  const int Th = rh < p.Ho ? (p.Ho - rh + sh - 1) / sh : 0;
  const int Tw = rw < p.Wo ? (p.Wo - rw + sw - 1) / sw : 0;
  const int64_t M = static_cast<int64_t>(p.N) * Td * Th * Tw;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(n_phase)) * BM;
  if (m0 >= M) return;  // uniform for the CTA, before any barrier

  const int n_ct = (p.cout_g + BN - 1) / BN;
  const int grp = blockIdx.y / n_ct;
  const int co0 = (blockIdx.y - grp * n_ct) * BN;
  const int cig0 = grp * p.cin_g;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  SType* sA = reinterpret_cast<SType*>(smem_raw);
  SType* sB = reinterpret_cast<SType*>(smem_raw + 2 * Cfg::kABytes);
  float* sR = reinterpret_cast<float*>(smem_raw);  // epilogue registers, alias sA/sB
  int64_t* s_yoff = reinterpret_cast<int64_t*>(smem_raw + Cfg::union_bytes(p.epi.n_regs));
  int* s_n = reinterpret_cast<int*>(s_yoff + BM);
  int* s_td = s_n + BM;
  int* s_th = s_td + BM;
  int* s_tw = s_th + BM;

  const int tid = threadIdx.x;

  // ---- phase geometry: computed by three threads, shared through shared memory ----
  __shared__ PhaseDim s_phase[3];
  if (tid < 3) {
    s_phase[tid] = tid == 0   ? phase_dim(rd, p.Do, sd, p.pad[0], p.dil[0], p.kD)
                   : tid == 1 ? phase_dim(rh, p.Ho, sh, p.pad[1], p.dil[1], p.kH)
                              : phase_dim(rw, p.Wo, sw, p.pad[2], p.dil[2], p.kW);
  }

  // ---- decode the tile's output voxels once (64-bit only when M needs it) ----
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t m = m0 + r;
    if (m < M) {
      int n, td, th, tw;
      if (M <= INT_MAX) {
        int q = static_cast<int>(m);
        tw = q % Tw;
        q /= Tw;
        th = q % Th;
        q /= Th;
        td = q % Td;
        n = q / Td;
      } else {
        int64_t q = m;
        tw = static_cast<int>(q % Tw);
        q /= Tw;
        th = static_cast<int>(q % Th);
        q /= Th;
        td = static_cast<int>(q % Td);
        n = static_cast<int>(q / Td);
      }
      s_n[r] = n;
      s_td[r] = td;
      s_th[r] = th;
      s_tw[r] = tw;
      s_yoff[r] = static_cast<int64_t>(n) * p.ys[0] + static_cast<int64_t>(rd + sd * td) * p.ys[2] +
                  static_cast<int64_t>(rh + sh * th) * p.ys[3] +
                  static_cast<int64_t>(rw + sw * tw) * p.ys[4];
    } else {
      s_n[r] = -1;
      s_td[r] = s_th[r] = s_tw[r] = 0;
      s_yoff[r] = 0;
    }
  }
  __syncthreads();
  const PhaseDim pdd = s_phase[0], pdh = s_phase[1], pdw = s_phase[2];

  // ---- loader state ----
  int a_row[Cfg::A_MPT], a_n[Cfg::A_MPT], a_td[Cfg::A_MPT], a_th[Cfg::A_MPT], a_tw[Cfg::A_MPT];
  const int a_k0 = BM >= kThreads ? 0 : (tid / BM) * Cfg::A_KPT;
#pragma unroll
  for (int i = 0; i < Cfg::A_MPT; ++i) {
    a_row[i] = BM >= kThreads ? tid + i * kThreads : tid % BM;
    a_n[i] = s_n[a_row[i]];
    a_td[i] = s_td[a_row[i]];
    a_th[i] = s_th[a_row[i]];
    a_tw[i] = s_tw[a_row[i]];
  }
  const int b_col = tid % BN;
  const int b_k0 = (tid / BN) * Cfg::B_KPT;

  const GType* __restrict__ X = static_cast<const GType*>(p.x);
  const GType* __restrict__ Wt = static_cast<const GType*>(p.w);

  GType ra[Cfg::A_MPT][Cfg::A_KPT];
  GType rb[Cfg::B_KPT];

  const int n_chunks = (p.cin_g + kBK - 1) / kBK;
  const int total = pdd.nT * pdh.nT * pdw.nT * n_chunks;

  auto load_step = [&](const KIter& ki) {
    const int offd = pdd.off0 - ki.jd * pdd.doff;
    const int offh = pdh.off0 - ki.jh * pdh.doff;
    const int offw = pdw.off0 - ki.jw * pdw.doff;
    const int ci0 = ki.chunk * kBK;
#pragma unroll
    for (int i = 0; i < Cfg::A_MPT; ++i) {
      const int id = a_td[i] + offd, ih = a_th[i] + offh, iw = a_tw[i] + offw;
      const bool ok = a_n[i] >= 0 && static_cast<unsigned>(id) < static_cast<unsigned>(p.Di) &&
                      static_cast<unsigned>(ih) < static_cast<unsigned>(p.Hi) &&
                      static_cast<unsigned>(iw) < static_cast<unsigned>(p.Wi);
      const int ci = ci0 + a_k0;
      const int kv = ok ? p.cin_g - ci : 0;  // channels of this row that exist
      const GType* src = X + (static_cast<int64_t>(a_n[i]) * p.xs[0] +
                              static_cast<int64_t>(cig0 + ci) * p.xs[1] +
                              static_cast<int64_t>(id) * p.xs[2] +
                              static_cast<int64_t>(ih) * p.xs[3] + static_cast<int64_t>(iw) * p.xs[4]);
#pragma unroll
      for (int kk = 0; kk < Cfg::A_KPT; ++kk) {
        ra[i][kk] = kk < kv ? *src : GType(0);
        src += p.xs[1];
      }
    }
    {
      const int kd = pdd.k0 + ki.jd * pdd.kstep;
      const int kh = pdh.k0 + ki.jh * pdh.kstep;
      const int kw = pdw.k0 + ki.jw * pdw.kstep;
      const int ci = ci0 + b_k0;
      const int co = co0 + b_col;
      const bool ok = co < p.cout_g;
      const int64_t base = static_cast<int64_t>(cig0 + ci) * p.ws[0] +
                           static_cast<int64_t>(co) * p.ws[1] + static_cast<int64_t>(kd) * p.ws[2] +
                           static_cast<int64_t>(kh) * p.ws[3] + static_cast<int64_t>(kw) * p.ws[4];
#pragma unroll
      for (int kk = 0; kk < Cfg::B_KPT; ++kk) {
        rb[kk] = (ok && ci + kk < p.cin_g) ? Wt[base + static_cast<int64_t>(kk) * p.ws[0]]
                                           : GType(0);
      }
    }
  };

  auto stash = [&](int buf) {
    SType* As = sA + buf * (BM * LDK);
    SType* Bs = sB + buf * (BN * LDK);
#pragma unroll
    for (int i = 0; i < Cfg::A_MPT; ++i) {
      SType tmp[Cfg::A_KPT];
#pragma unroll
      for (int kk = 0; kk < Cfg::A_KPT; ++kk) {
        if constexpr (MODE == kModeTensorCore && IN_DT == kF32) {
          tmp[kk] = __uint_as_float(f32_to_tf32(ra[i][kk]));
        } else {
          tmp[kk] = ra[i][kk];
        }
      }
      store_row(As + a_row[i] * LDK + a_k0, tmp);
    }
    SType tmp[Cfg::B_KPT];
#pragma unroll
    for (int kk = 0; kk < Cfg::B_KPT; ++kk) {
      if constexpr (MODE == kModeTensorCore && IN_DT == kF32) {
        tmp[kk] = __uint_as_float(f32_to_tf32(rb[kk]));
      } else {
        tmp[kk] = rb[kk];
      }
    }
    store_row(Bs + b_col * LDK + b_k0, tmp);
  };

  // ---- accumulators: the mma.sync C-fragment layout in every mode ----
  // acc[mi][ni][r]: row = warp_m*WTM + mi*16 + lane/4 + (r >= 2 ? 8 : 0),
  //                 col = warp_n*WTN + ni*8 + 2*(lane%4) + (r & 1).
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int lg = lane >> 2, lt = lane & 3;
  float acc[MT][NT][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;

  auto compute = [&](int buf) {
    const SType* As = sA + buf * (BM * LDK);
    const SType* Bs = sB + buf * (BN * LDK);
    if constexpr (MODE == kModeFfma) {
      // Blocked summation: the kBK products of a step are summed apart and then added to the
      // accumulator, which keeps the rounding error of long K sums near cuDNN's.
      float part[MT][NT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) part[mi][ni][r] = 0.0f;
#pragma unroll
      for (int k = 0; k < kBK; k += 4) {
        float4 a[MT][2], b[NT][2];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const int row = warp_m * Cfg::WTM + mi * 16 + lg;
          a[mi][0] = *reinterpret_cast<const float4*>(As + row * LDK + k);
          a[mi][1] = *reinterpret_cast<const float4*>(As + (row + 8) * LDK + k);
        }
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
          const int col = warp_n * Cfg::WTN + ni * 8 + 2 * lt;
          b[ni][0] = *reinterpret_cast<const float4*>(Bs + col * LDK + k);
          b[ni][1] = *reinterpret_cast<const float4*>(Bs + (col + 1) * LDK + k);
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int ni = 0; ni < NT; ++ni) {
            float* c = part[mi][ni];
            c[0] = fmaf(a[mi][0].x, b[ni][0].x, c[0]);
            c[1] = fmaf(a[mi][0].x, b[ni][1].x, c[1]);
            c[2] = fmaf(a[mi][1].x, b[ni][0].x, c[2]);
            c[3] = fmaf(a[mi][1].x, b[ni][1].x, c[3]);
            c[0] = fmaf(a[mi][0].y, b[ni][0].y, c[0]);
            c[1] = fmaf(a[mi][0].y, b[ni][1].y, c[1]);
            c[2] = fmaf(a[mi][1].y, b[ni][0].y, c[2]);
            c[3] = fmaf(a[mi][1].y, b[ni][1].y, c[3]);
            c[0] = fmaf(a[mi][0].z, b[ni][0].z, c[0]);
            c[1] = fmaf(a[mi][0].z, b[ni][1].z, c[1]);
            c[2] = fmaf(a[mi][1].z, b[ni][0].z, c[2]);
            c[3] = fmaf(a[mi][1].z, b[ni][1].z, c[3]);
            c[0] = fmaf(a[mi][0].w, b[ni][0].w, c[0]);
            c[1] = fmaf(a[mi][0].w, b[ni][1].w, c[1]);
            c[2] = fmaf(a[mi][1].w, b[ni][0].w, c[2]);
            c[3] = fmaf(a[mi][1].w, b[ni][1].w, c[3]);
          }
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[mi][ni][r] += part[mi][ni][r];
    } else if constexpr (IN_DT == kF32) {  // TF32 m16n8k8
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 8) {
        uint32_t af[MT][4], bf[NT][2];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const int row = warp_m * Cfg::WTM + mi * 16 + lg;
          af[mi][0] = __float_as_uint(As[row * LDK + ks + lt]);
          af[mi][1] = __float_as_uint(As[(row + 8) * LDK + ks + lt]);
          af[mi][2] = __float_as_uint(As[row * LDK + ks + lt + 4]);
          af[mi][3] = __float_as_uint(As[(row + 8) * LDK + ks + lt + 4]);
        }
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
          const int col = warp_n * Cfg::WTN + ni * 8 + lg;
          bf[ni][0] = __float_as_uint(Bs[col * LDK + ks + lt]);
          bf[ni][1] = __float_as_uint(Bs[col * LDK + ks + lt + 4]);
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int ni = 0; ni < NT; ++ni) mma_tf32(acc[mi][ni], af[mi], bf[ni]);
      }
    } else {  // FP16 / BF16 m16n8k16 (kBK == 16: one mma step)
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        const int row = warp_m * Cfg::WTM + mi * 16 + lg;
        af[mi][0] = *reinterpret_cast<const uint32_t*>(As + row * LDK + 2 * lt);
        af[mi][1] = *reinterpret_cast<const uint32_t*>(As + (row + 8) * LDK + 2 * lt);
        af[mi][2] = *reinterpret_cast<const uint32_t*>(As + row * LDK + 2 * lt + 8);
        af[mi][3] = *reinterpret_cast<const uint32_t*>(As + (row + 8) * LDK + 2 * lt + 8);
      }
#pragma unroll
      for (int ni = 0; ni < NT; ++ni) {
        const int col = warp_n * Cfg::WTN + ni * 8 + lg;
        bf[ni][0] = *reinterpret_cast<const uint32_t*>(Bs + col * LDK + 2 * lt);
        bf[ni][1] = *reinterpret_cast<const uint32_t*>(Bs + col * LDK + 2 * lt + 8);
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) mma_16<IN_DT>(acc[mi][ni], af[mi], bf[ni]);
    }
  };

  // ---- main loop: prefetch step it+1 into registers while computing step it ----
  if (total > 0) {
    KIter ki{0, 0, 0, 0};
    load_step(ki);
    stash(0);
    __syncthreads();
    for (int it = 0; it < total; ++it) {
      const int cur = it & 1;
      const bool more = it + 1 < total;
      if (more) {
        ki.next(n_chunks, pdw.nT, pdh.nT);
        load_step(ki);
      }
      compute(cur);
      if (more) stash(cur ^ 1);
      __syncthreads();
    }
  }

  // ---- epilogue: fragments + bias -> register 0 ----
  constexpr int LDC = Cfg::LDC;
#pragma unroll
  for (int ni = 0; ni < NT; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = warp_n * Cfg::WTN + ni * 8 + 2 * lt + j;
      float bias = 0.0f;
      if (p.bias != nullptr && co0 + col < p.cout_g) {
        bias = load_as_float(p.bias, grp * p.cout_g + co0 + col, IN_DT);
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        const int row = warp_m * Cfg::WTM + mi * 16 + lg;
        sR[col * LDC + row] = acc[mi][ni][j] + bias;
        sR[col * LDC + row + 8] = acc[mi][ni][2 + j] + bias;
      }
    }
  __syncthreads();

  // ---- the program over the tile (voxel-fast element order) ----
  auto pos = [&](int i) {
    const int e = tid + i * kThreads;
    const int m = e % BM;
    const int c = e / BM;
    ElemPos q;
    q.idx = c * LDC + m;
    q.n = s_n[m];
    q.ok = q.n >= 0 && co0 + c < p.cout_g;
    q.c = grp * p.cout_g + co0 + c;
    q.d = rd + sd * s_td[m];
    q.h = rh + sh * s_th[m];
    q.w = rw + sw * s_tw[m];
    return q;
  };
  run_program<Cfg::kPer>(p.epi, sR, Cfg::kTileFloats, pos);

  // ---- one store per element; lanes walk the output's contiguous dimension: voxels
  // (NCDHW) or channels (channels_last, which needs the other element order) ----
  const bool chan_fast = p.ys[1] == 1 && p.Cout > 1;
  if (chan_fast) __syncthreads();
  const float* out = sR + p.epi.out_reg * Cfg::kTileFloats;
  const int64_t ys1 = p.ys[1];
  const int cmax = p.cout_g - co0;
  const int cog0 = grp * p.cout_g + co0;
  auto store_all = [&](auto* y) {
    using T = typename std::remove_pointer<decltype(y)>::type;
    auto put = [&](int m, int c) {
      if (s_n[m] < 0 || c >= cmax) return;
      const float v = out[c * LDC + m];
      T* dst = y + s_yoff[m] + static_cast<int64_t>(cog0 + c) * ys1;
      if constexpr (std::is_same<T, float>::value) {
        *dst = v;
      } else if constexpr (std::is_same<T, __half>::value) {
        *dst = __float2half_rn(v);
      } else {
        *dst = __float2bfloat16_rn(v);
      }
    };
    if (chan_fast) {
#pragma unroll 4
      for (int i = 0; i < Cfg::kPer; ++i) {
        const int e = tid + i * kThreads;
        put(e / BN, e % BN);
      }
    } else {
#pragma unroll 4
      for (int i = 0; i < Cfg::kPer; ++i) {
        const int e = tid + i * kThreads;
        put(e % BM, e / BM);
      }
    }
  };
  if (p.y_dtype == kF16) {
    store_all(static_cast<__half*>(p.y));
  } else if (p.y_dtype == kBF16) {
    store_all(static_cast<__nv_bfloat16*>(p.y));
  } else {
    store_all(static_cast<float*>(p.y));
  }
}

// ---------------------------------------------------------------------------------------
// Host side: grid, shared memory, launch on the caller's stream. Returns the launch error.
template <int IN_DT, int MODE, int BM, int BN, int WARPS_M, int WARPS_N>
cudaError_t launch_tile(const ConvParams& p, cudaStream_t stream) {
  using Cfg = Tile<IN_DT, MODE, BM, BN, WARPS_M, WARPS_N>;
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  const int64_t td = (p.Do + p.st[0] - 1) / p.st[0];
  const int64_t th = (p.Ho + p.st[1] - 1) / p.st[1];
  const int64_t tw = (p.Wo + p.st[2] - 1) / p.st[2];
  const int64_t m_max = static_cast<int64_t>(p.N) * td * th * tw;
  const int64_t n_phase = static_cast<int64_t>(p.st[0]) * p.st[1] * p.st[2];
  const int64_t gx = (m_max + BM - 1) / BM * n_phase;
  const int64_t gy = static_cast<int64_t>(p.groups) * ((p.cout_g + BN - 1) / BN);
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = conv_transpose3d_fused_kernel<IN_DT, MODE, BM, BN, WARPS_M, WARPS_N>;
  const int smem = Cfg::smem_bytes(p.epi.n_regs);
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), kThreads, smem,
           stream>>>(p);
  return cudaGetLastError();
}

// Tile choice by output channels per group (BM * BN = 4096 outputs per CTA).
template <int IN_DT, int MODE>
cudaError_t launch_conv(const ConvParams& p, cudaStream_t stream) {
  if (p.cout_g <= 16) return launch_tile<IN_DT, MODE, 256, 16, 4, 1>(p, stream);
  if (p.cout_g <= 32) return launch_tile<IN_DT, MODE, 128, 32, 4, 1>(p, stream);
  return launch_tile<IN_DT, MODE, 64, 64, 2, 2>(p, stream);
}

}  // namespace ct3d
