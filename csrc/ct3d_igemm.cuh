// Channels-last implicit GEMM for the tensor cores (TF32 / FP16 / BF16), groups == 1. No torch
// header.
//
// Same gather form and stride phases as conv_transpose3d_fused_kernel (ct3d_conv.cuh), but the
// main loop reads a padded channels-last copy of the input instead of the caller's tensor:
//
//   xp (N, Dp, Hp, Wp, Cp)   made by pack_input_kernel from x of any strides: the input plus a
//                            zero halo (lo in front, enough behind) so that every tap of every
//                            phase reads inside xp, and C_in padded with zeros to Cp (a multiple
//                            of the K step); float32 values rounded to TF32 once here (cvt.rna);
//   wp (kD, kH, kW, CoutP, Cp)  the weight, C_in fastest, C_out padded to CoutP (a multiple of
//                            BN), TF32-rounded for float32 (_cuda.py packs and caches it).
//
// With both operands K-contiguous and in bounds, a K step (one tap, BKB bytes of input
// channels) is a rectangle of 16-byte rows for A and B: cp.async copies them into shared
// memory STAGES steps ahead (no registers, no bounds checks, no conversion in the main loop),
// ldmatrix.x4 forms the mma fragments, and mma.sync runs the product (m16n8k8 TF32,
// m16n8k16 FP16/BF16, FP32 accumulation). The output tile then takes the same epilogue and
// store as the other kernels (register 0 of the shared-memory tile file, run_program,
// store_tile).
//
// Shared-memory rows are padded by 16 bytes: row pitch 80 or 144 bytes, so the 8 row addresses
// of an ldmatrix phase fall in 8 distinct groups of 4 banks (no conflicts).
#pragma once

#include "ct3d_conv.cuh"

namespace ct3d {

// Halo of one dimension: the input indices t + off0 - j*doff the phases read, over every phase.
inline void igemm_halo(int in, int out, int s, int pad, int dil, int k, int& lo, int& hi) {
  int mn = 0, mx = in - 1;
  for (int r = 0; r < s; ++r) {
    const PhaseDim d = phase_dim(r, out, s, pad, dil, k);
    if (d.T == 0 || d.nT == 0) continue;
    const int a = d.off0 - (d.nT - 1) * d.doff;  // smallest input index (t = 0, last tap)
    const int b = d.T - 1 + d.off0;              // largest (t = T - 1, first tap)
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
  lo = -mn;
  hi = mx - (in - 1);
}

// Fills the extents of g for K steps of `ck` channels and output tiles of `bn` channels.
inline void igemm_geometry(const ConvParams& p, int ck, int bn, IgemmGeom& g) {
  int lo, hi;
  igemm_halo(p.Di, p.Do, p.st[0], p.pad[0], p.dil[0], p.kD, lo, hi);
  g.lo[0] = lo;
  g.Dp = p.Di + lo + hi;
  igemm_halo(p.Hi, p.Ho, p.st[1], p.pad[1], p.dil[1], p.kH, lo, hi);
  g.lo[1] = lo;
  g.Hp = p.Hi + lo + hi;
  igemm_halo(p.Wi, p.Wo, p.st[2], p.pad[2], p.dil[2], p.kW, lo, hi);
  g.lo[2] = lo;
  g.Wp = p.Wi + lo + hi;
  g.Cp = (p.Cin + ck - 1) / ck * ck;
  g.CoutP = (p.Cout + bn - 1) / bn * bn;
}

// ---------------------------------------------------------------------------------------
// x (any strides) -> xp, transposed through shared memory: a CTA of 256 threads takes 32
// consecutive padded voxels x one group of CC = 32 channels (16 when Cp is not a multiple of
// 32). Loads: lanes walk the 32 voxels of one channel (coalesced along W for NCDHW); stores:
// each voxel's CC channels as 16-byte vectors, the CTA's stores one contiguous run of xp when
// Cp == CC. Halo voxels and padded channels are written as zeros.
constexpr int kPackVox = 32;

template <typename T, bool ROUND_TF32>
__global__ void __launch_bounds__(256)
    pack_input_kernel(const __grid_constant__ ConvParams p, const __grid_constant__ IgemmGeom g) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ T tile[32][kPackVox + 1];
  const int cc = g.Cp % 32 == 0 ? 32 : 16;
  const int c0 = blockIdx.y * cc;
  const int64_t vox = static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * kPackVox;
  const int tid = threadIdx.x;
  {
    const int j = tid % kPackVox;  // voxel of the tile this thread loads
    const int64_t v = v0 + j;
    const T* src = nullptr;
    if (v < vox) {
      int64_t q = v;
      const int wp = static_cast<int>(q % g.Wp);
      q /= g.Wp;
      const int hp = static_cast<int>(q % g.Hp);
      q /= g.Hp;
      const int dp = static_cast<int>(q % g.Dp);
      const int n = static_cast<int>(q / g.Dp);
      const int id = dp - g.lo[0], ih = hp - g.lo[1], iw = wp - g.lo[2];
      if (static_cast<unsigned>(id) < static_cast<unsigned>(p.Di) &&
          static_cast<unsigned>(ih) < static_cast<unsigned>(p.Hi) &&
          static_cast<unsigned>(iw) < static_cast<unsigned>(p.Wi)) {
        src = static_cast<const T*>(p.x) + static_cast<int64_t>(n) * p.xs[0] +
              static_cast<int64_t>(id) * p.xs[2] + static_cast<int64_t>(ih) * p.xs[3] +
              static_cast<int64_t>(iw) * p.xs[4];
      }
    }
    for (int c = tid / kPackVox; c < cc; c += 256 / kPackVox) {
      T val = T(0);
      if (src != nullptr && c0 + c < p.Cin) val = __ldg(src + static_cast<int64_t>(c0 + c) * p.xs[1]);
      if constexpr (ROUND_TF32) val = __uint_as_float(f32_to_tf32(val));
      tile[c][j] = val;
    }
  }
  __syncthreads();
  const int per_vox = cc / kVec;  // 16-byte vectors per voxel
  for (int e = tid; e < kPackVox * per_vox; e += 256) {
    const int j = e / per_vox, k = e - j * per_vox;
    const int64_t v = v0 + j;
    if (v >= vox) continue;
    T buf[kVec];
#pragma unroll
    for (int t = 0; t < kVec; ++t) buf[t] = tile[k * kVec + t][j];
    uint4 u;
    memcpy(&u, buf, 16);
    *reinterpret_cast<uint4*>(static_cast<T*>(const_cast<void*>(g.xp)) + v * g.Cp + c0 +
                              k * kVec) = u;
  }
}

// ---------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Tile configuration: BM voxels x BN channels, K steps of BKB bytes (64: 16 float32 / 32 half
// channels; 128: 32 / 64), STAGES-deep cp.async pipeline, WARPS_M x WARPS_N warps.
template <int IN_DT, int BM, int BN, int BKB, int WARPS_M, int WARPS_N, int STAGES>
struct IgTile {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static_assert(BKB == 64 || BKB == 128, "K step of 64 or 128 bytes");
  using GType = typename std::conditional<IN_DT == kF32, float, uint16_t>::type;
  static constexpr int kElem = static_cast<int>(sizeof(GType));
  static constexpr int BK = BKB / kElem;          // channels per K step
  static constexpr int kPitch = BKB + 16;         // shared row pitch (bytes)
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
  static constexpr int MT = WTM / 16, NT = WTN / 8;
  static_assert(MT * 16 == WTM && NT * 8 == WTN && NT % 2 == 0, "warp tile");
  static constexpr int CH = BKB / 16;             // 16-byte chunks per row
  static constexpr int A_RPP = kThreads / CH;     // rows per loader pass
  static constexpr int A_IT = BM / A_RPP;
  static_assert(A_IT * A_RPP == BM, "A loader");
  static constexpr int B_IT = (BN * CH + kThreads - 1) / kThreads;
  static constexpr int kAStage = BM * kPitch, kBStage = BN * kPitch;  // bytes
  static constexpr int kMainBytes = STAGES * (kAStage + kBStage);
  static constexpr int LDC = BM + 4;
  static constexpr int kTileFloats = BN * LDC;
  static constexpr int kTileBytes = kTileFloats * static_cast<int>(sizeof(float));
  // per row: output offset (int64), then n, t_d, t_h, t_w and the byte offset of its voxel
  // in xp (int)
  static constexpr int kInfoBytes = BM * static_cast<int>(sizeof(int64_t) + 5 * sizeof(int));
  static constexpr int kPer = BM * BN / kThreads;
  static __host__ __device__ int union_bytes(int n_regs) {
    const int regs = n_regs * kTileBytes;
    return kMainBytes > regs ? kMainBytes : regs;
  }
  static __host__ __device__ int smem_bytes(int n_regs) { return union_bytes(n_regs) + kInfoBytes; }
};

template <int IN_DT, int BM, int BN, int BKB, int WARPS_M, int WARPS_N, int STAGES,
          int MIN_CTAS>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, MIN_CTAS)
    conv_transpose3d_igemm_kernel(const __grid_constant__ ConvParams p,
                                  const __grid_constant__ IgemmGeom g) {
  using Cfg = IgTile<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  constexpr int kThreads = Cfg::kThreads;
  using GType = typename Cfg::GType;
  constexpr int MT = Cfg::MT, NT = Cfg::NT, kPitch = Cfg::kPitch;

  // ---- phase, tile position ----
  const TileOrigin to = tile_origin<BM>(p);
  if (to.m0 >= to.M) return;  // uniform for the CTA, before any barrier
  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];
  const int rd = to.rd, rh = to.rh, rw = to.rw, Td = to.Td, Th = to.Th, Tw = to.Tw;
  const int64_t M = to.M, m0 = to.m0;
  const int co0 = blockIdx.y * BN;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sA = smem_raw;
  unsigned char* sB = smem_raw + STAGES * Cfg::kAStage;
  float* sR = reinterpret_cast<float*>(smem_raw);  // epilogue registers, alias sA/sB
  int64_t* s_yoff = reinterpret_cast<int64_t*>(smem_raw + Cfg::union_bytes(p.epi.n_regs));
  int* s_n = reinterpret_cast<int*>(s_yoff + BM);
  int* s_td = s_n + BM;
  int* s_th = s_td + BM;
  int* s_tw = s_th + BM;
  int* s_xoff = s_tw + BM;

  const int tid = threadIdx.x;
  __shared__ PhaseDim s_phase[3];
  phase_dims(p, to, s_phase, tid);
  // Rows past M load the last voxel's inputs (always inside xp) and are never stored.
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t m = m0 + r;
    int n, td, th, tw;
    split_index(m < M ? m : M - 1, M, FastDiv(Tw), FastDiv(Th), FastDiv(Td), Tw, Th, Td, n, td,
                th, tw);
    s_n[r] = m < M ? n : -1;
    s_xoff[r] = (((n * g.Dp + td + g.lo[0]) * g.Hp + th + g.lo[1]) * g.Wp + tw + g.lo[2]) *
                g.Cp * Cfg::kElem;
    s_td[r] = td;
    s_th[r] = th;
    s_tw[r] = tw;
    s_yoff[r] = static_cast<int64_t>(n) * p.ys[0] + static_cast<int64_t>(rd + sd * td) * p.ys[2] +
                static_cast<int64_t>(rh + sh * th) * p.ys[3] +
                static_cast<int64_t>(rw + sw * tw) * p.ys[4];
    if (m >= M) s_yoff[r] = 0;
  }
  __syncthreads();
  const PhaseDim pdd = s_phase[0], pdh = s_phase[1], pdw = s_phase[2];

  // ---- loader state (byte offsets; launch_igemm checks that xp and wp fit in 2^31 bytes) ----
  const int chunk = tid % Cfg::CH;
  const int a_r0 = tid / Cfg::CH;
  int a_off[Cfg::A_IT];
#pragma unroll
  for (int i = 0; i < Cfg::A_IT; ++i) a_off[i] = s_xoff[a_r0 + i * Cfg::A_RPP] + chunk * 16;
  int b_off[Cfg::B_IT];
  bool b_on[Cfg::B_IT];
#pragma unroll
  for (int i = 0; i < Cfg::B_IT; ++i) {
    const int idx = tid + i * kThreads;
    b_on[i] = idx < BN * Cfg::CH;
    const int brow = idx / Cfg::CH, bch = idx % Cfg::CH;
    b_off[i] = (co0 + brow) * g.Cp * Cfg::kElem + bch * 16;
  }
  const uint32_t sA0 = smem_u32(sA), sB0 = smem_u32(sB);
  const uint32_t a_dst0 = sA0 + a_r0 * kPitch + chunk * 16;
  const char* __restrict__ Xp = static_cast<const char*>(g.xp);
  const char* __restrict__ Wp = static_cast<const char*>(g.wp);

  const int n_chunks = g.Cp / Cfg::BK;
  const int total = pdd.nT * pdh.nT * pdw.nT * n_chunks;
  const int tap_bytes = g.CoutP * g.Cp * Cfg::kElem;

  auto load_stage = [&](int stage, const KIter& ki) {
    const int offd = pdd.off0 - ki.jd * pdd.doff;
    const int offh = pdh.off0 - ki.jh * pdh.doff;
    const int offw = pdw.off0 - ki.jw * pdw.doff;
    const int a_step = ((offd * g.Hp + offh) * g.Wp + offw) * g.Cp * Cfg::kElem + ki.chunk * BKB;
    const int kd = pdd.k0 + ki.jd * pdd.kstep;
    const int kh = pdh.k0 + ki.jh * pdh.kstep;
    const int kw = pdw.k0 + ki.jw * pdw.kstep;
    const int b_step = ((kd * p.kH + kh) * p.kW + kw) * tap_bytes + ki.chunk * BKB;
    const uint32_t a_dst = a_dst0 + stage * Cfg::kAStage;
#pragma unroll
    for (int i = 0; i < Cfg::A_IT; ++i) {
      cp_async_16(a_dst + i * Cfg::A_RPP * kPitch, Xp + (a_off[i] + a_step));
    }
    const uint32_t b_dst = sB0 + stage * Cfg::kBStage;
#pragma unroll
    for (int i = 0; i < Cfg::B_IT; ++i) {
      const int idx = tid + i * kThreads;
      if (b_on[i]) {
        cp_async_16(b_dst + (idx / Cfg::CH) * kPitch + (idx % Cfg::CH) * 16,
                    Wp + (b_off[i] + b_step));
      }
    }
  };

  // ---- accumulators: the mma.sync C-fragment layout (as in the other kernel) ----
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  float acc[MT][NT][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;

  // ldmatrix lane addresses. A (16 x 32 bytes per fragment): matrices (rows 0-7, bytes 0-15),
  // (rows 8-15, 0-15), (rows 0-7, 16-31), (rows 8-15, 16-31) = a0..a3 of the mma. B (stored
  // [n][k]; two n8 fragments per x4): (n 0-7, 0-15), (n 0-7, 16-31), (n 8-15, 0-15),
  // (n 8-15, 16-31) = b0, b1 of fragment ni and of ni + 1.
  const int q = lane >> 3, r8 = lane & 7;
  const uint32_t a_frag0 =
      sA0 + (warp_m * Cfg::WTM + r8 + (q & 1) * 8) * kPitch + (q >> 1) * 16;
  const uint32_t b_frag0 =
      sB0 + (warp_n * Cfg::WTN + r8 + (q >> 1) * 8) * kPitch + (q & 1) * 16;

  auto compute = [&](int stage) {
    const uint32_t a_base = a_frag0 + stage * Cfg::kAStage;
    const uint32_t b_base = b_frag0 + stage * Cfg::kBStage;
#pragma unroll
    for (int kb = 0; kb < BKB; kb += 32) {
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) ldmatrix_x4(af[mi], a_base + mi * 16 * kPitch + kb);
#pragma unroll
      for (int nj = 0; nj < NT / 2; ++nj) {
        uint32_t t[4];
        ldmatrix_x4(t, b_base + nj * 16 * kPitch + kb);
        bf[2 * nj][0] = t[0];
        bf[2 * nj][1] = t[1];
        bf[2 * nj + 1][0] = t[2];
        bf[2 * nj + 1][1] = t[3];
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
          if constexpr (IN_DT == kF32) {
            mma_tf32(acc[mi][ni], af[mi], bf[ni]);
          } else {
            mma_16<IN_DT>(acc[mi][ni], af[mi], bf[ni]);
          }
        }
    }
  };

  // ---- main loop: STAGES - 1 steps in flight while one is multiplied ----
  if (total > 0) {
    KIter kl{0, 0, 0, 0};
    int loaded = 0;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (loaded < total) {
        load_stage(s, kl);
        kl.next(n_chunks, pdw.nT, pdh.nT);
        ++loaded;
      }
      cp_async_commit();
    }
    for (int it = 0; it < total; ++it) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // step it is in shared memory; step it - 1's buffer is free
      if (loaded < total) {
        load_stage(loaded % STAGES, kl);
        kl.next(n_chunks, pdw.nT, pdh.nT);
        ++loaded;
      }
      cp_async_commit();
      compute(it % STAGES);
    }
    cp_async_wait<0>();
  }
  __syncthreads();  // the epilogue tiles alias the pipeline buffers

  // ---- epilogue: fragments + bias -> register 0, the program, the store (groups == 1) ----
  gemm_epilogue<IN_DT, BM, BN, Cfg::LDC, Cfg::WTM, Cfg::WTN, MT, NT, kThreads>(
      p, acc, sR, to, s_n, s_td, s_th, s_tw, s_yoff, 0, co0, warp_m, warp_n, tid);
}

// ---------------------------------------------------------------------------------------
// Host side. `g` holds the geometry (igemm_geometry with ck = BKB / element size and bn = BN)
// and the pointers of xp (scratch of N*Dp*Hp*Wp*Cp elements the caller allocated) and wp.
template <int IN_DT, int BM, int BN, int BKB, int WARPS_M, int WARPS_N, int STAGES,
          int MIN_CTAS = (WARPS_M * WARPS_N == 4 ? 2 : 1)>
cudaError_t launch_igemm_tile(const ConvParams& p, const IgemmGeom& g, cudaStream_t stream) {
  using Cfg = IgTile<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  using T = typename Cfg::GType;
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  if (p.groups != 1 || g.Cp % Cfg::BK != 0 || g.CoutP % BN != 0) return cudaErrorInvalidValue;
  // pack the input
  const int64_t vox = static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp;
  if (vox == 0) return cudaSuccess;
  const int64_t pb = (vox + kPackVox - 1) / kPackVox;
  const int pc = g.Cp / (g.Cp % 32 == 0 ? 32 : 16);
  if (pb > INT_MAX || pc > 65535) return cudaErrorInvalidConfiguration;
  pack_input_kernel<T, IN_DT == kF32>
      <<<dim3(static_cast<unsigned>(pb), static_cast<unsigned>(pc), 1), 256, 0, stream>>>(p, g);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  // the GEMM
  const int64_t td = (p.Do + p.st[0] - 1) / p.st[0];
  const int64_t th = (p.Ho + p.st[1] - 1) / p.st[1];
  const int64_t tw = (p.Wo + p.st[2] - 1) / p.st[2];
  const int64_t m_max = static_cast<int64_t>(p.N) * td * th * tw;
  const int64_t n_phase = static_cast<int64_t>(p.st[0]) * p.st[1] * p.st[2];
  const int64_t gx = (m_max + BM - 1) / BM * n_phase;
  const int64_t gy = g.CoutP / BN;
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
  auto kernel =
      conv_transpose3d_igemm_kernel<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES, MIN_CTAS>;
  const int smem = Cfg::smem_bytes(p.epi.n_regs);
  if (smem > 48 * 1024) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), Cfg::kThreads, smem,
           stream>>>(p, g);
  return cudaGetLastError();
}

// Tile configurations by id (_cuda.py IGEMM_CONFIGS mirrors this table: K step bytes, BM, BN,
// warps):
//   0-2  128-byte K steps, 3 stages, 4 warps: 128 x 64 (2 x 2), 128 x 32 (4 x 1), 128 x 16 (4 x 1)
//   3-5  64-byte K steps, 4 stages, the same tiles
//   6    128-byte K steps, 3 stages, 8 warps: 128 x 128 (2 x 4)
//   7    64-byte K steps, 3 stages, 8 warps: 256 x 64 (4 x 2)
//   8    64-byte K steps, 3 stages, 8 warps: 128 x 128 (2 x 4)
//   9    as 3, registers capped for 3 CTAs per multiprocessor
//   10   as 0, 2 stages, registers capped for 3 CTAs per multiprocessor
template <int IN_DT>
cudaError_t launch_igemm(const ConvParams& p, const IgemmGeom& g, int config,
                         cudaStream_t stream) {
  switch (config) {
    case 0: return launch_igemm_tile<IN_DT, 128, 64, 128, 2, 2, 3>(p, g, stream);
    case 1: return launch_igemm_tile<IN_DT, 128, 32, 128, 4, 1, 3>(p, g, stream);
    case 2: return launch_igemm_tile<IN_DT, 128, 16, 128, 4, 1, 3>(p, g, stream);
    case 3: return launch_igemm_tile<IN_DT, 128, 64, 64, 2, 2, 4>(p, g, stream);
    case 4: return launch_igemm_tile<IN_DT, 128, 32, 64, 4, 1, 4>(p, g, stream);
    case 5: return launch_igemm_tile<IN_DT, 128, 16, 64, 4, 1, 4>(p, g, stream);
    case 6: return launch_igemm_tile<IN_DT, 128, 128, 128, 2, 4, 3>(p, g, stream);
    case 7: return launch_igemm_tile<IN_DT, 256, 64, 64, 4, 2, 3>(p, g, stream);
    case 8: return launch_igemm_tile<IN_DT, 128, 128, 64, 2, 4, 3>(p, g, stream);
    case 9: return launch_igemm_tile<IN_DT, 128, 64, 64, 2, 2, 4, 3>(p, g, stream);
    case 10: return launch_igemm_tile<IN_DT, 128, 64, 128, 2, 2, 2, 3>(p, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ct3d
