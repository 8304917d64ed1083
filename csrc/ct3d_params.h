// Plain-data launch parameters shared by the host binding (g++) and the kernels (nvcc).
//
// No CUDA and no torch header here: the binding fills a ConvParams from tensors, the
// kernels read it as a __grid_constant__ parameter (about 2.6 KB, under the 4 KB limit of
// kernel parameters).
//
// Units and layouts:
//   * every stride is in elements (not bytes) and is 64-bit, so tensors over 2^31 elements work;
//   * x is read as (N, C_in, D, H, W) with arbitrary strides (NCDHW, channels_last_3d,
//     sliced views);
//   * w is read as (C_in, C_out/groups, kD, kH, kW) with arbitrary strides (the Python side
//     passes a repacked copy whose C_out dimension is contiguous);
//   * y is written as (N, C_out, D_out, H_out, W_out) with arbitrary non-overlapping strides;
//   * every epilogue tensor ("slot") is read through 5 strides of its view expanded to the
//     output shape (0 for broadcast dimensions).
#pragma once

#include <stdint.h>

namespace ct3d {

constexpr int kMaxInstr = 48;  // epilogue instructions per program (Python: _cuda.MAX_INSTR)
constexpr int kMaxSlots = 16;  // epilogue tensors per program (Python: _cuda.MAX_SLOTS)
constexpr int kMaxRegs = 6;    // epilogue tile registers (Python: _cuda.MAX_REGS)
// Output channels a SOFTMAX instruction may combine: every kernel's tile holds this many
// channels of a voxel (Python: _cuda.SOFTMAX_MAX_CHANNELS).
constexpr int kMaxSoftmaxChannels = 64;

// Element types, as codes (Python: _cuda._DTYPE_CODE).
enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Main-loop arithmetic. kModeFfma: exact FP32 (float32 input only). kModeTensorCore: TF32
// mma.sync m16n8k8 for float32 input, FP16/BF16 mma.sync m16n8k16 for half inputs; FP32
// accumulation in every mode.
enum Mode : int32_t { kModeFfma = 0, kModeTensorCore = 1 };

// Kernel choice (ConvParams.algo): kAlgoAuto lets launch_conv (ct3d_conv.cuh) pick by shape;
// kAlgoAutoStaged too, and may pick the direct kernel's staged-input form (direct_staged_pays;
// Python: _cuda.DIRECT_STAGED_AUTO); the others force one kernel (tests, timing). The launch
// reports the kernel that ran.
enum Algo : int32_t {
  kAlgoAuto = 0,
  kAlgoGemm = 1,
  kAlgoDirect = 2,
  kAlgoDirectStaged = 3,
  kAlgoAutoStaged = 4
};
enum Kernel : int32_t { kKernelGemm = 0, kKernelDirect = 1, kKernelDirectStaged = 2 };

// Opcodes: the numbers of ct3d_fx.ops.Opcode (the Python side checks they agree).
enum OpCode : int32_t {
  OP_LOAD_SCALAR = 1,
  OP_LOAD_TENSOR = 2,
  OP_ADD = 10,
  OP_SUB = 11,
  OP_MUL = 12,
  OP_DIV = 13,
  OP_NEG = 20,
  OP_ABS = 21,
  OP_SQUARE = 22,
  OP_RELU = 23,
  OP_LEAKY_RELU = 24,
  OP_PRELU = 25,
  OP_ELU = 26,
  OP_CELU = 27,
  OP_SELU = 28,
  OP_GELU = 29,
  OP_SILU = 30,
  OP_MISH = 31,
  OP_HARDSWISH = 32,
  OP_HARDSIGMOID = 33,
  OP_HARDTANH = 34,
  OP_SIGMOID = 35,
  OP_TANH = 36,
  OP_SOFTPLUS = 37,
  OP_CLAMP = 38,
  OP_BATCH_NORM = 39,
  OP_DETACH = 40,  // never reaches the kernel: _cuda.py folds it into its operand
  OP_SOFTMAX = 41,
  OP_LAYER_NORM = 42,
};

// One decoded epilogue instruction. The program runs on a small register file of output
// tiles (kMaxRegs at most); the Python side allocates the registers (value 0, the convolution
// output plus bias, starts in register 0) and folds scalar operands of binary ops into
// immediates:
//   d                      destination register
//   ADD/SUB/MUL/DIV        a, b = source registers, or -1 for the immediates f0 (a), f1 (b)
//   other ops              a = source register
//   LOAD_SCALAR            f0 = the scalar
//   LOAD_TENSOR            c = slot
//   LEAKY_RELU/ELU/CELU    f0 = slope / alpha
//   PRELU                  c = slot of the weight (1 or C elements)
//   GELU                   b = 1 for the tanh approximation, 0 for erf
//   HARDTANH/SOFTPLUS      f0, f1 = (min, max) / (beta, threshold)
//   CLAMP                  f0, f1 = min, max (-inf / +inf when absent)
//   BATCH_NORM             c = slot of running_mean (var, weight, bias follow), b = affine,
//                          f0 = eps
//   SOFTMAX                b = 1 for log_softmax; over the output channels of each voxel (a
//                          row of the tile: the tile must hold all C_out channels, groups == 1)
//   LAYER_NORM             over W (the last dimension) of each (n, c, d, h) line: c = slot of
//                          the weight, b = slot of the bias (-1: absent; 1-D, W_out elements,
//                          read at w * s[4]), f0 = eps. Only the W-line tiles (ct3d_igemm.cuh
//                          conv_transpose3d_igemm_wline_kernel) hold whole lines
struct Instr {
  int32_t op, a, b, c, d;
  float f0, f1;
};

// One epilogue tensor: data pointer, 5 strides (elements) of its view expanded to
// (N, C_out, D_out, H_out, W_out), element type, and whether those strides are the output's
// (a full-size side input laid out like y: its element offset is the output element's).
struct Slot {
  const void* ptr;
  int64_t s[5];
  int32_t dtype;
  int32_t like_y;  // 2: as 1, and the epilogue pass holds it in shared memory (side_slot)
};

struct Epilogue {
  int32_t n_instr;
  int32_t n_slots;
  int32_t n_regs;   // tile registers the program uses (>= 1)
  int32_t out_reg;  // register holding the result
  Instr ins[kMaxInstr];
  Slot slot[kMaxSlots];
};

// Whether the program has an instruction that combines the channels of a voxel (SOFTMAX): the
// kernel's tile must then hold all of them (host code: the launchers check it).
inline bool epilogue_spans_channels(const Epilogue& E) {
  for (int i = 0; i < E.n_instr; ++i)
    if (E.ins[i].op == OP_SOFTMAX) return true;
  return false;
}

// Whether the program has an instruction that combines the W positions of a line (LAYER_NORM):
// only the W-line tile configurations run it (host code: the launchers check it).
inline bool epilogue_spans_w(const Epilogue& E) {
  for (int i = 0; i < E.n_instr; ++i)
    if (E.ins[i].op == OP_LAYER_NORM) return true;
  return false;
}

struct ConvParams {
  // input (N, C_in, D, H, W)
  const void* x;
  int64_t xs[5];
  int32_t N, Cin, Di, Hi, Wi;
  // weight (C_in, C_out/groups, kD, kH, kW), same dtype as x
  const void* w;
  int64_t ws[5];
  int32_t kD, kH, kW;
  // bias (C_out,) contiguous, same dtype as x, or nullptr
  const void* bias;
  // output (N, C_out, D_out, H_out, W_out)
  void* y;
  int64_t ys[5];
  int32_t Cout, Do, Ho, Wo;
  int32_t y_dtype;
  // convolution
  int32_t groups, cin_g, cout_g;
  int32_t st[3], pad[3], dil[3];
  int32_t algo;  // Algo
  Epilogue epi;
};

// The channels-last implicit GEMM tabulates the stride phases of each dimension (strides up to
// kMaxStride; _cuda.py sends larger strides to the other kernels).
constexpr int kMaxStride = 8;

// One stride phase of one dimension (the fields of ct3d_conv.cuh PhaseDim) and the magic
// numbers of a division by its output extent T (ct3d_conv.cuh FastDiv, T >= 1).
struct PhaseEntry {
  int32_t T, k0, nT, kstep, off0, doff;
  uint32_t div_m, div_l;
};

// Geometry of the packed operands of the channels-last implicit GEMM (ct3d_igemm.cuh):
// igemm_plan fills the extents and the phase table, the caller the pointers.
struct IgemmGeom {
  const void* xp;  // (N, Dp, Hp, Wp, Cp), C fastest: the input with a zero halo
  const void* wp;  // (kD, kH, kW, CoutP, Cp), C_in fastest: the packed weight
  int32_t Dp, Hp, Wp, Cp;
  int32_t lo[3];  // zero halo in front of the input along d, h, w
  int32_t CoutP;
  PhaseEntry ph[3][kMaxStride];  // [dimension d, h, w][phase residue]
  // Split-K (row tiles only): the K steps of each tile are divided among `splits` CTAs
  // (grid z); each writes its FP32 partial tile to `ws` (tiles x splits x BM x BN floats,
  // ws_floats of them) and bumps the tile's counter in `counters` (zeroed, one int per tile);
  // the last to arrive sums the partials in split order (deterministic) and runs the epilogue.
  int32_t splits;  // 1: no split
  float* ws;
  int64_t ws_floats;
  int32_t* counters;
};

// The spatial softmax (csrc/kernels_spatial_softmax.cu): `rows` = N * C rows of L = D * H * W
// contiguous elements each (an NCDHW tensor), split into `chunks` chunks of `chunk` elements
// (a multiple of the vector width when `vec`); `partial` holds rows * chunks (max, sum) pairs.
struct SpatialSoftmaxParams {
  const void* x;
  void* out;
  const float* weight;  // C per-channel factors (float32, contiguous) or nullptr
  float* partial;  // rows * chunks * 2 floats
  int64_t rows, L, chunk;
  int32_t chunks, C;
  int32_t in_dtype, out_dtype;  // DType: (f32, f32), (f16|bf16, same or f32)
  int32_t log;                  // 1: log_softmax
  int32_t vec;                  // 1: 16-byte loads (L % vec width == 0, 16-byte aligned rows)
  int32_t cluster;  // > 0: the one-read kernel, clusters of this many CTAs per row (sm_90, vec);
                    // 0: the two kernels (chunks of `chunk` elements, `partial`)
  int32_t nvec;     // cluster > 0: 0 for the registers form, else the shared-memory form with
                    // nvec 16-byte vectors per thread (1-16; nvec * 4 KB of shared memory)
};

// The pooled tail (csrc/kernels_pool_tail.cu): avg_pool3d with kernel == stride (kd, kh, kw),
// no padding, floor mode, on a contiguous NCDHW tensor, then at most one elementwise activation,
// into a contiguous (N, C, Do, Ho, Wo) output of the input's dtype.
struct PoolTailParams {
  const void* x;
  void* out;
  int64_t nc;                // N * C
  int32_t D, H, W;           // input spatial size
  int32_t Do, Ho, Wo;        // output spatial size: D / kd, H / kh, W / kw (floor)
  int32_t kd, kh, kw;
  int32_t dtype;             // DType: kF32, kF16 or kBF16 (input and output)
  int32_t act;               // 0 (none) or an Op: OP_RELU, OP_GELU, OP_SILU, OP_SIGMOID, OP_TANH
  int32_t act_flag;          // OP_GELU: 1 for the tanh approximation
  int32_t max;               // 1: max_pool3d (NaN wins, as in PyTorch), 0: avg_pool3d
};

// The normalization tail (csrc/kernels_norm_tail.cu): GroupNorm (InstanceNorm: groups == C) of
// a fused site's contiguous NCDHW output, with its per-channel affine, then one activation. Three
// kernels: per-(row, chunk) partial statistics (count, mean, M2) of each (n, c) row in chunks of
// norm_chunk(dtype) elements -> per-(n, group) mean and 1 / sqrt(var + eps) (merged in double) ->
// the normalized, activated output. The binding allocates `partial` (rows * chunks * 3 floats)
// and `stats` (N * groups * 2 floats).
constexpr int kNormThreads = 256;
// 8-element vectors per thread and CTA: 128 bytes in flight per thread in every dtype (four
// float32 vectors, eight float16 / bfloat16 ones).
constexpr int norm_vecs_per_thread(int32_t dtype) { return dtype == kF32 ? 4 : 8; }
// Elements of a row per CTA: 8192 (float32) or 16384 (float16, bfloat16).
constexpr int64_t norm_chunk(int32_t dtype) {
  return int64_t{kNormThreads} * norm_vecs_per_thread(dtype) * 8;
}
struct NormTailParams {
  const void* x;
  void* out;
  const float* weight;       // (C,) float32 or null (no affine scale)
  const float* bias;         // (C,) float32 or null (no affine shift)
  float* partial;            // rows * chunks * 3: count, mean, M2 of each chunk
  float* stats;              // N * groups * 2: mean, rstd of each (n, group)
  int64_t rows;              // N * C
  int64_t S;                 // D * H * W: elements of a row
  int32_t C, groups;         // channels, groups (C % groups == 0)
  int32_t chunks;            // ceil(S / norm_chunk(dtype)): CTAs per row
  int32_t dtype;             // DType: kF32, kF16 or kBF16 (input and output)
  int32_t act;               // 0 (none) or an Op: OP_RELU, OP_LEAKY_RELU, OP_GELU, OP_SILU,
                             // OP_SIGMOID, OP_TANH, OP_HARDSWISH
  int32_t act_flag;          // OP_GELU: 1 for the tanh approximation
  float alpha;               // OP_LEAKY_RELU: the negative slope
  float eps;
  int32_t vec;               // 1: 16-byte vectors (S % 8 == 0 and x, out 16-byte aligned)
};

// The epilogue pass's vector kernels (csrc/ct3d_pass_lite.cuh): elements per vector, and the
// form the binding allows (EpiPassParams.lite).
constexpr int kLiteE = 8;
enum LiteMode : int32_t { kLiteOff = 0, kLiteSame = 1, kLiteTranspose = 2,
                          kLiteTransposeScalarOut = 3 };

// The epilogue pass (csrc/kernels_epilogue_pass.cu): the program of `epi` (register 0 = src +
// bias) over an (N, C, D, H, W) tensor `src` whose spatial dimensions collapse to one stride
// (NCDHW contiguous or channels_last_3d), written to `out` (same shape, likewise collapsible);
// S = D * H * W (< 2^31 - 128). *_cfast: the channel stride is 1 (channels_last_3d), so the
// kernel reads or writes 32 consecutive channels per warp access instead of 32 consecutive
// positions.
struct EpiPassParams {
  const void* src;
  int64_t ss_n, ss_c, ss_s;  // element strides of src: sample, channel, spatial position
  int32_t src_dtype, src_cfast;
  const void* bias;  // (C,) contiguous or nullptr
  int32_t bias_dtype;
  void* out;
  int64_t os_n, os_c, os_s;
  int32_t out_dtype, out_cfast;
  int32_t N, C, D, H, W;
  int64_t S;
  int32_t staged;  // 1: the staged kernel (src read in 4-byte units with cp.async; binding)
  // The staged kernel also stages epilogue slot `side_slot` (>= 0; its Slot.like_y is 2): a
  // full-size tensor with out's strides and src's dtype, read like src in 4-byte units.
  int32_t side_slot;
  // 16-byte units (binding): the source / side slot copied with 16-byte cp.async, the output
  // stored 16 bytes at a time, along each tensor's fast dimension (stride 1, extent and the
  // other strides multiples of the unit, 16-byte aligned data)
  int32_t vec_src, vec_side, vec_out;
  // The vector kernels (csrc/ct3d_pass_lite.cuh LiteMode): 0 off, 1 same layout, 2
  // channels_last_3d -> NCDHW, 3 the same with scalar output stores (S or the output's
  // strides not multiples of 8); the binding sets it where the tensors allow 8-element 16-byte
  // vectors, the launch where the program allows it too (lite_program_ok)
  int32_t lite;
  Epilogue epi;
};

}  // namespace ct3d
