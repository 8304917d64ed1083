// The one torch-facing file: checks arguments, fills ct3d::ConvParams, launches the fused
// kernel on the current stream of the input's device, checks the launch.
//
// Python (ct3d_fx/_cuda.py) has already validated the op's arguments, allocated the output
// with the fake kernel's shape/strides/dtype, repacked the weight and decoded the epilogue;
// the checks here guard the ABI between the two sides.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "ct3d_launch.h"
#include "ct3d_params.h"

namespace {

// A TORCH_CHECK message as one string: numbers through std::to_string, dtypes through
// c10::toString, devices through Device::str(), text as it is. TORCH_CHECK streams each of its
// arguments with operator<<, and streaming a number crashed the process on the H200 machine
// (torch 2.11, CUDA 13; v28: the norm tail's first rejection, a SIGSEGV instead of a
// RuntimeError) as streaming an IntArrayRef did in v20; with one string argument it raises.
template <typename T>
std::string msg_piece(const T& v) {
  if constexpr (std::is_same<T, bool>::value) {
    return v ? "true" : "false";
  } else if constexpr (std::is_arithmetic<T>::value) {
    return std::to_string(v);
  } else if constexpr (std::is_same<T, at::ScalarType>::value) {
    return c10::toString(v);
  } else if constexpr (std::is_same<T, at::Device>::value) {
    return v.str();
  } else {
    return std::string(v);
  }
}
inline std::string msg_piece(const char* v) { return v; }

template <typename... A>
std::string ct3d_msg(const A&... a) {
  std::string r;
  ((r += msg_piece(a)), ...);
  return r;
}

int32_t dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return ct3d::kF32;
    case at::kHalf:
      return ct3d::kF16;
    case at::kBFloat16:
      return ct3d::kBF16;
    case at::kDouble:
      return ct3d::kF64;
    default:
      TORCH_CHECK(false, ct3d_msg("ct3d: ", what,
                                  " must be float32, float16, bfloat16 or float64, got ", t));
  }
  return -1;
}

// "[d0, d1, ...]" for error messages. Built here with std::to_string: printing an IntArrayRef
// with operator<< in a TORCH_CHECK message crashed the process on the H200 machine (torch 2.11,
// CUDA 13) instead of raising (tests/test_epilogue_pass.py, test_pass_rejects_...).
std::string dims(at::IntArrayRef a) {
  std::string r = "[";
  for (size_t i = 0; i < a.size(); ++i) r += (i ? ", " : "") + std::to_string(a[i]);
  return r + "]";
}

void check_cuda_on(const at::Tensor& t, const at::Device& dev, const char* what) {
  TORCH_CHECK(t.is_cuda(),
              ct3d_msg("ct3d: ", what, " must be a CUDA tensor, got device ", t.device()));
  TORCH_CHECK(t.device() == dev, ct3d_msg("ct3d: ", what, " is on ", t.device(), ", expected ", dev,
                                          " (the input's device)"));
}

// Fills E from the decoded program (the arguments of `prepare` below); ys: the output's 5
// strides (a slot with the same strides is read at the output element's offset: Slot.like_y);
// groups and cout_g: the conv's (SOFTMAX needs one group of at most kMaxSoftmaxChannels).
void fill_epilogue(ct3d::Epilogue& E, const at::Device& dev, const int64_t* ys,
                   const std::vector<at::Tensor>& slots, const at::Tensor& slot_strides,
                   const at::Tensor& prog_i, const at::Tensor& prog_f,
                   const std::vector<int64_t>& regs, int64_t groups, int64_t cout_g) {
  const int64_t n_slots = static_cast<int64_t>(slots.size());
  TORCH_CHECK(n_slots <= ct3d::kMaxSlots,
              ct3d_msg("ct3d: at most ", ct3d::kMaxSlots, " epilogue tensors, got ", n_slots));
  TORCH_CHECK(slot_strides.device().is_cpu() && slot_strides.scalar_type() == at::kLong &&
                  slot_strides.is_contiguous() && slot_strides.dim() == 2 &&
                  slot_strides.size(0) == n_slots && slot_strides.size(1) == 5,
              ct3d_msg("ct3d: slot_strides must be a contiguous CPU int64 tensor of shape (",
                       n_slots, ", 5), got ", dims(slot_strides.sizes())));
  const int64_t* ss = slot_strides.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_slots; ++i) {
    const at::Tensor& t = slots[i];
    check_cuda_on(t, dev, "epilogue tensor");
    E.slot[i].ptr = t.data_ptr();
    bool like_y = true;
    for (int j = 0; j < 5; ++j) {
      E.slot[i].s[j] = ss[i * 5 + j];
      like_y = like_y && ss[i * 5 + j] == ys[j];
    }
    E.slot[i].like_y = like_y ? 1 : 0;
    E.slot[i].dtype = dtype_code(t.scalar_type(), "epilogue tensor");
  }
  E.n_slots = static_cast<int32_t>(n_slots);
  TORCH_CHECK(regs.size() == 2,
              ct3d_msg("ct3d: regs must hold 2 ints (count, result register), got ", regs.size()));
  const int64_t n_regs = regs[0];
  TORCH_CHECK(
      n_regs >= 1 && n_regs <= ct3d::kMaxRegs,
      ct3d_msg("ct3d: the program must use 1 to ", ct3d::kMaxRegs, " registers, got ", n_regs));
  TORCH_CHECK(regs[1] >= 0 && regs[1] < n_regs,
              ct3d_msg("ct3d: result register must be in [0, ", n_regs, "), got ", regs[1]));
  TORCH_CHECK(prog_i.device().is_cpu() && prog_i.scalar_type() == at::kInt &&
                  prog_i.is_contiguous() && prog_i.dim() == 2 && prog_i.size(1) == 5,
              ct3d_msg("ct3d: prog_i must be a contiguous CPU int32 tensor of shape (n, 5), got ",
                       dims(prog_i.sizes())));
  const int64_t n_instr = prog_i.size(0);
  TORCH_CHECK(n_instr <= ct3d::kMaxInstr,
              ct3d_msg("ct3d: at most ", ct3d::kMaxInstr, " epilogue instructions, got ", n_instr));
  TORCH_CHECK(prog_f.device().is_cpu() && prog_f.scalar_type() == at::kFloat &&
                  prog_f.is_contiguous() && prog_f.dim() == 2 && prog_f.size(0) == n_instr &&
                  prog_f.size(1) == 2,
              ct3d_msg("ct3d: prog_f must be a contiguous CPU float32 tensor of shape (", n_instr,
                       ", 2), got ", dims(prog_f.sizes())));
  const int32_t* pi = prog_i.data_ptr<int32_t>();
  const float* pf = prog_f.data_ptr<float>();
  for (int64_t i = 0; i < n_instr; ++i) {
    ct3d::Instr& I = E.ins[i];
    I.op = pi[5 * i];
    I.a = pi[5 * i + 1];
    I.b = pi[5 * i + 2];
    I.c = pi[5 * i + 3];
    I.d = pi[5 * i + 4];
    I.f0 = pf[2 * i];
    I.f1 = pf[2 * i + 1];
    const bool binary = I.op == ct3d::OP_ADD || I.op == ct3d::OP_SUB || I.op == ct3d::OP_MUL ||
                        I.op == ct3d::OP_DIV;
    const bool loads = I.op == ct3d::OP_LOAD_SCALAR || I.op == ct3d::OP_LOAD_TENSOR;
    TORCH_CHECK(I.d >= 0 && I.d < n_regs,
                ct3d_msg("ct3d: epilogue instruction ", i, ": destination register must be in [0, ",
                         n_regs, "), got ", I.d));
    TORCH_CHECK(loads || (I.a >= (binary ? -1 : 0) && I.a < n_regs),
                ct3d_msg("ct3d: epilogue "
                         "instruction ",
                         i, ": source register out of range: ", I.a));
    TORCH_CHECK(
        !binary || (I.b >= -1 && I.b < n_regs),
        ct3d_msg("ct3d: epilogue instruction ", i, ": second source register out of range: ", I.b));
    const int need = I.op == ct3d::OP_BATCH_NORM ? (I.b ? 4 : 2)
                     : (I.op == ct3d::OP_LOAD_TENSOR || I.op == ct3d::OP_PRELU) ? 1 : 0;
    TORCH_CHECK(need == 0 || (I.c >= 0 && I.c + need <= n_slots),
                ct3d_msg("ct3d: epilogue instruction ", i, ": slot ", I.c, " out of range for ",
                         n_slots, " epilogue tensors"));
    TORCH_CHECK(
        I.op != ct3d::OP_LAYER_NORM || (I.b >= -1 && I.b < n_slots && I.c >= -1 && I.c < n_slots),
        ct3d_msg("ct3d: epilogue instruction ", i, ": LAYER_NORM weight slot ", I.c,
                 " or bias slot ", I.b, " out of range for ", n_slots, " epilogue tensors"));
    TORCH_CHECK(I.op != ct3d::OP_SOFTMAX || (groups == 1 && cout_g <= ct3d::kMaxSoftmaxChannels),
                ct3d_msg("ct3d: epilogue instruction ", i,
                         ": SOFTMAX over the channels needs groups == 1 "
                         "and at most ",
                         ct3d::kMaxSoftmaxChannels, " output channels, got groups=", groups,
                         " and C_out=", cout_g * groups));
  }
  E.n_regs = static_cast<int32_t>(n_regs);
  E.out_reg = static_cast<int32_t>(regs[1]);
  E.n_instr = static_cast<int32_t>(n_instr);
}

// x: (N, C_in, D, H, W); w: (C_in, C_out/groups, kD, kH, kW), any strides; bias: (C_out,)
// contiguous or None; y: (N, C_out, D_out, H_out, W_out) preallocated; slots: the epilogue's
// device tensors; slot_strides: CPU int64 (len(slots), 5), strides of each slot expanded to
// y's shape; prog_i: CPU int32 (n_instr, 5) = op, a, b, c, d; prog_f: CPU float32 (n_instr, 2);
// regs: (registers the program uses, register of the result); conv: stride(3), padding(3),
// dilation(3), groups; mode: 0 exact FP32, 1 tensor cores; algo: 0 the kernel launch_conv picks,
// 1 the implicit GEMM, 2 the direct kernel (where it applies), 3 its staged-input form (where
// it applies, else as 2), 4 as 0 but the choice may take the staged form (ct3d::Algo). Returns
// the kernel that ran (0 implicit GEMM, 1 direct, 2 direct staged), -1 when the output is empty.
ct3d::ConvParams prepare(const at::Tensor& x, const at::Tensor& w,
                         const c10::optional<at::Tensor>& bias, at::Tensor& y,
                         const std::vector<at::Tensor>& slots, const at::Tensor& slot_strides,
                         const at::Tensor& prog_i, const at::Tensor& prog_f,
                         const std::vector<int64_t>& regs, const std::vector<int64_t>& conv,
                         int64_t mode, int64_t algo) {
  const at::Device dev = x.device();
  check_cuda_on(x, dev, "input");
  check_cuda_on(w, dev, "weight");
  check_cuda_on(y, dev, "output");
  TORCH_CHECK(x.dim() == 5, ct3d_msg("ct3d: input must be 5-D, got ", x.dim(), "-D"));
  TORCH_CHECK(w.dim() == 5, ct3d_msg("ct3d: weight must be 5-D, got ", w.dim(), "-D"));
  TORCH_CHECK(y.dim() == 5, ct3d_msg("ct3d: output must be 5-D, got ", y.dim(), "-D"));
  TORCH_CHECK(conv.size() == 10,
              ct3d_msg("ct3d: conv must hold 10 ints (stride, padding, dilation, "
                       "groups), got ",
                       conv.size()));
  const int32_t in_dt = dtype_code(x.scalar_type(), "input");
  TORCH_CHECK(in_dt != ct3d::kF64, "ct3d: the fused kernel does not take float64 input");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(),
              ct3d_msg("ct3d: weight dtype ", w.scalar_type(), " must match input dtype ",
                       x.scalar_type()));
  const int32_t y_dt = dtype_code(y.scalar_type(), "output");
  TORCH_CHECK(y_dt != ct3d::kF64, "ct3d: the fused kernel does not write float64 output");
  TORCH_CHECK(mode == ct3d::kModeFfma || mode == ct3d::kModeTensorCore,
              ct3d_msg("ct3d: mode must be 0 (exact FP32) or 1 (tensor cores), got ", mode));
  TORCH_CHECK(
      algo >= ct3d::kAlgoAuto && algo <= ct3d::kAlgoAutoStaged,
      ct3d_msg("ct3d: algo must be 0 (auto), 1 (implicit GEMM), 2 (direct), 3 (direct staged) or "
               "4 (auto, staged allowed), got ",
               algo));
  TORCH_CHECK(mode == ct3d::kModeTensorCore || in_dt == ct3d::kF32,
              ct3d_msg("ct3d: mode 0 (exact FP32) needs float32 input, got ", x.scalar_type()));

  const int64_t groups = conv[9];
  TORCH_CHECK(groups >= 1, ct3d_msg("ct3d: groups must be >= 1, got ", groups));
  TORCH_CHECK(x.size(1) == w.size(0),
              ct3d_msg("ct3d: input has ", x.size(1), " channels, expected ", w.size(0),
                       " (weight.size(0))"));
  TORCH_CHECK(w.size(0) % groups == 0,
              ct3d_msg("ct3d: C_in=", w.size(0), " must be divisible by groups=", groups));
  TORCH_CHECK(y.size(0) == x.size(0),
              ct3d_msg("ct3d: output batch ", y.size(0), " must equal input batch ", x.size(0)));
  TORCH_CHECK(y.size(1) == w.size(1) * groups,
              ct3d_msg("ct3d: output has ", y.size(1), " channels, expected ", w.size(1) * groups,
                       " (weight.size(1) * groups)"));
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(conv[i] >= 1 && conv[6 + i] >= 1 && conv[3 + i] >= 0,
                "ct3d: stride and dilation must be positive and padding non-negative");
  }
  for (int64_t s : x.sizes()) TORCH_CHECK(s <= INT32_MAX, "ct3d: input dimension too large");
  for (int64_t s : y.sizes()) TORCH_CHECK(s <= INT32_MAX, "ct3d: output dimension too large");

  ct3d::ConvParams p;
  std::memset(&p, 0, sizeof(p));
  p.x = x.data_ptr();
  for (int i = 0; i < 5; ++i) p.xs[i] = x.stride(i);
  p.N = static_cast<int32_t>(x.size(0));
  p.Cin = static_cast<int32_t>(x.size(1));
  p.Di = static_cast<int32_t>(x.size(2));
  p.Hi = static_cast<int32_t>(x.size(3));
  p.Wi = static_cast<int32_t>(x.size(4));
  p.w = w.data_ptr();
  for (int i = 0; i < 5; ++i) p.ws[i] = w.stride(i);
  p.kD = static_cast<int32_t>(w.size(2));
  p.kH = static_cast<int32_t>(w.size(3));
  p.kW = static_cast<int32_t>(w.size(4));
  p.bias = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_cuda_on(*bias, dev, "bias");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(),
                ct3d_msg("ct3d: bias dtype ", bias->scalar_type(), " must match input dtype ",
                         x.scalar_type()));
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == y.size(1) && bias->is_contiguous(),
                ct3d_msg("ct3d: bias must be contiguous 1-D with ", y.size(1),
                         " elements, got shape ", dims(bias->sizes())));
    p.bias = bias->data_ptr();
  }
  p.y = y.data_ptr();
  for (int i = 0; i < 5; ++i) p.ys[i] = y.stride(i);
  p.Cout = static_cast<int32_t>(y.size(1));
  p.Do = static_cast<int32_t>(y.size(2));
  p.Ho = static_cast<int32_t>(y.size(3));
  p.Wo = static_cast<int32_t>(y.size(4));
  p.y_dtype = y_dt;
  p.groups = static_cast<int32_t>(groups);
  p.cin_g = static_cast<int32_t>(w.size(0) / groups);
  p.cout_g = static_cast<int32_t>(w.size(1));
  for (int i = 0; i < 3; ++i) {
    p.st[i] = static_cast<int32_t>(conv[i]);
    p.pad[i] = static_cast<int32_t>(conv[3 + i]);
    p.dil[i] = static_cast<int32_t>(conv[6 + i]);
  }
  p.algo = static_cast<int32_t>(algo);

  // ---- epilogue ----
  fill_epilogue(p.epi, dev, p.ys, slots, slot_strides, prog_i, prog_f, regs, p.groups, p.cout_g);
  return p;
}

int64_t launch(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
               at::Tensor& y, const std::vector<at::Tensor>& slots,
               const at::Tensor& slot_strides, const at::Tensor& prog_i,
               const at::Tensor& prog_f, const std::vector<int64_t>& regs,
               const std::vector<int64_t>& conv, int64_t mode, int64_t algo) {
  const ct3d::ConvParams p = prepare(x, w, bias, y, slots, slot_strides, prog_i, prog_f, regs,
                                     conv, mode, algo);
  const int32_t in_dt = dtype_code(x.scalar_type(), "input");
  const at::Device dev = x.device();
  TORCH_CHECK(!ct3d::epilogue_spans_w(p.epi), "ct3d: a LAYER_NORM epilogue runs on the "
              "channels-last implicit GEMM's W-line tiles only (launch_igemm, config 25 or 26)");
  if (y.numel() == 0) return -1;
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  cudaError_t err;
  int kernel = -1;
  if (in_dt == ct3d::kF32) {
    err = mode == ct3d::kModeTensorCore ? ct3d::launch_f32_tf32(p, stream, &kernel)
                                        : ct3d::launch_f32_ffma(p, stream, &kernel);
  } else if (in_dt == ct3d::kF16) {
    err = ct3d::launch_f16_tc(p, stream, &kernel);
  } else {
    err = ct3d::launch_bf16_tc(p, stream, &kernel);
  }
  TORCH_CHECK(err == cudaSuccess, ct3d_msg("ct3d: fused conv_transpose3d kernel launch failed: ",
                                           cudaGetErrorString(err)));
  return kernel;
}

// The channels-last implicit GEMM (csrc/ct3d_igemm.cuh): tensor cores, groups == 1. Same
// arguments as launch() (w: the caller's weight, for its shape) plus wpk, the weight packed by
// _cuda.py as (kD, kH, kW, CoutP, Cp) contiguous (float32 values TF32-rounded), ck = channels
// per K step (16 or 32 float32, 32 or 64 half), bn = output channels per tile (16, 32, 64,
// 128), config = the tile configuration (csrc/ct3d_igemm.cuh launch_igemm) with those values,
// bm = its output voxels per tile, splits = split-K factor (1: none; row tiles only).
// Allocates the padded channels-last input copy (N, Dp, Hp, Wp, Cp) on the current stream, and
// for splits > 1 the FP32 partial tiles and the zeroed per-tile counters. Returns 3 when the
// sm_90a wgmma kernel ran (configurations 19-24 on compute capability 9.0), 5 when its
// bulk-copy form ran (27, 28: wpk blocked, _cuda.py _packed_weight_wgmma_bulk), 4 when a bulk
// configuration could not run here (nothing launched; the caller repacks the weight and runs
// another configuration), 2 for the mma.sync kernels, -1 for an empty output.
int64_t launch_igemm(const at::Tensor& x, const at::Tensor& w,
                     const c10::optional<at::Tensor>& bias, at::Tensor& y,
                     const std::vector<at::Tensor>& slots, const at::Tensor& slot_strides,
                     const at::Tensor& prog_i, const at::Tensor& prog_f,
                     const std::vector<int64_t>& regs, const std::vector<int64_t>& conv,
                     const at::Tensor& wpk, int64_t ck, int64_t bn, int64_t config, int64_t bm,
                     int64_t splits) {
  const ct3d::ConvParams p = prepare(x, w, bias, y, slots, slot_strides, prog_i, prog_f, regs,
                                     conv, ct3d::kModeTensorCore, ct3d::kAlgoAuto);
  const at::Device dev = x.device();
  TORCH_CHECK(p.groups == 1,
              ct3d_msg("ct3d: the channels-last implicit GEMM needs groups == 1, got ", p.groups));
  TORCH_CHECK(
      p.st[0] <= ct3d::kMaxStride && p.st[1] <= ct3d::kMaxStride && p.st[2] <= ct3d::kMaxStride,
      ct3d_msg("ct3d: the channels-last implicit GEMM takes strides up to ", ct3d::kMaxStride,
               ", got (", p.st[0], ", ", p.st[1], ", ", p.st[2], ")"));
  const int64_t esize = x.element_size();
  TORCH_CHECK(ck * esize == 64 || ck * esize == 128,
              ct3d_msg("ct3d: K step of ", ck, " channels must be 64 or 128 bytes"));
  TORCH_CHECK(bn == 16 || bn == 32 || bn == 64 || bn == 128,
              ct3d_msg("ct3d: bn must be 16, 32, 64 or 128, got ", bn));
  TORCH_CHECK(bn >= p.cout_g || !ct3d::epilogue_spans_channels(p.epi),
              ct3d_msg("ct3d: a SOFTMAX epilogue needs all ", p.cout_g,
                       " output channels in one tile, "
                       "got bn=",
                       bn));
  TORCH_CHECK(
      !ct3d::epilogue_spans_w(p.epi) || config == 25 || config == 26,
      ct3d_msg("ct3d: a LAYER_NORM epilogue needs a W-line tile configuration (25 or 26), got ",
               config));
  ct3d::IgemmGeom g;
  std::memset(&g, 0, sizeof(g));
  ct3d::igemm_plan(p, static_cast<int>(ck), static_cast<int>(bn), &g);
  check_cuda_on(wpk, dev, "packed weight");
  TORCH_CHECK(wpk.scalar_type() == x.scalar_type() && wpk.is_contiguous() && wpk.dim() == 5 &&
                  wpk.size(0) == p.kD && wpk.size(1) == p.kH && wpk.size(2) == p.kW &&
                  wpk.size(3) == g.CoutP && wpk.size(4) == g.Cp,
              ct3d_msg("ct3d: packed weight must be contiguous (", p.kD, ", ", p.kH, ", ", p.kW,
                       ", ", g.CoutP, ", ", g.Cp, ") of the input's dtype, got ", dims(wpk.sizes()),
                       " ", wpk.scalar_type()));
  const int64_t xp_elems = static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp * g.Cp;
  TORCH_CHECK(xp_elems * esize < INT32_MAX && wpk.numel() * esize < INT32_MAX,
              "ct3d: operands too large for the channels-last implicit GEMM (32-bit offsets)");
  if (y.numel() == 0) return -1;
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  TORCH_CHECK(splits >= 1 && splits <= 1024 && bm >= 16 && bm <= 256,
              ct3d_msg("ct3d: split-K factor must be in [1, 1024] and bm in [16, 256], got ",
                       splits, " and ", bm));
  g.splits = static_cast<int32_t>(splits);
  // One scratch allocation (host time: small models are bound by it): xp, then for split-K
  // the FP32 partial tiles and the per-tile counters (zeroed here, on the stream)
  const int64_t xp_bytes = (xp_elems * esize + 255) / 256 * 256;
  int64_t tiles = 0;
  if (splits > 1) {
    int64_t m_max = p.N;
    for (int i = 0; i < 3; ++i) {
      const int64_t out = i == 0 ? p.Do : i == 1 ? p.Ho : p.Wo;
      m_max *= (out + p.st[i] - 1) / p.st[i];
    }
    tiles = (m_max + bm - 1) / bm * p.st[0] * p.st[1] * p.st[2] * (g.CoutP / bn);
    g.ws_floats = tiles * splits * bm * bn;
  }
  const int64_t ws_bytes = (g.ws_floats * 4 + 255) / 256 * 256;
  at::Tensor scratch = at::empty({xp_bytes + ws_bytes + tiles * 4}, x.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  g.xp = base;
  g.wp = wpk.data_ptr();
  if (splits > 1) {
    g.ws = reinterpret_cast<float*>(base + xp_bytes);
    g.counters = reinterpret_cast<int32_t*>(base + xp_bytes + ws_bytes);
    const cudaError_t zero = cudaMemsetAsync(g.counters, 0, tiles * 4, stream);
    TORCH_CHECK(zero == cudaSuccess,
                ct3d_msg("ct3d: zeroing the split-K counters failed: ", cudaGetErrorString(zero)));
  }
  const int cfg = static_cast<int>(config);
  cudaError_t err;
  int wgmma = 0;
  if (x.scalar_type() == at::kFloat) {
    err = ct3d::launch_f32_tf32_igemm(p, g, cfg, stream, &wgmma);
  } else if (x.scalar_type() == at::kHalf) {
    err = ct3d::launch_f16_tc_igemm(p, g, cfg, stream, &wgmma);
  } else {
    err = ct3d::launch_bf16_tc_igemm(p, g, cfg, stream, &wgmma);
  }
  TORCH_CHECK(err == cudaSuccess,
              ct3d_msg("ct3d: fused conv_transpose3d (implicit GEMM) launch failed: ",
                       cudaGetErrorString(err)));
  return wgmma == 2 ? 5 : wgmma == 1 ? 3 : wgmma < 0 ? 4 : 2;
}

// x: contiguous (N, C, *spatial) float32/float16/bfloat16 with N * C > 0; out: contiguous, x's
// shape, dtype x's or float32; weight: contiguous float32 (C,) or None. Softmax (log_softmax
// when `log`) over the spatial positions of each (n, c), times weight[c]: see
// csrc/kernels_spatial_softmax.cu. max_cluster (0-8): the largest cluster of a one-read kernel
// (compute capability 9.0 and up, 16-byte vectors, rows of at most max_cluster CTAs' worth); 0
// always runs the two kernels. shared_vecs (0-16): 0 picks the one-read registers form (16
// vectors per thread), 1-16 the shared-memory form with at most that many vectors per thread
// (the row spread evenly over the cluster's CTAs). Returns -(cluster size) when a one-read
// kernel ran, else the number of chunks each row was split into (0 for an empty tensor).
int64_t spatial_softmax(const at::Tensor& x, at::Tensor& out,
                        const c10::optional<at::Tensor>& weight, bool log, int64_t max_cluster,
                        int64_t shared_vecs) {
  const at::Device dev = x.device();
  check_cuda_on(x, dev, "input");
  check_cuda_on(out, dev, "output");
  TORCH_CHECK(
      x.dim() >= 2 && x.is_contiguous() && out.is_contiguous() && out.sizes() == x.sizes(),
      ct3d_msg("ct3d: spatial_softmax needs contiguous input and output of the same shape, got ",
               dims(x.sizes()), " and ", dims(out.sizes())));
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  ct3d::SpatialSoftmaxParams p{};
  p.C = static_cast<int32_t>(x.size(1));
  p.rows = x.size(0) * x.size(1);
  p.L = p.rows == 0 ? 0 : x.numel() / p.rows;
  p.in_dtype = dtype_code(x.scalar_type(), "input");
  p.out_dtype = dtype_code(out.scalar_type(), "output");
  if (weight.has_value()) {
    check_cuda_on(*weight, dev, "weight");
    TORCH_CHECK(
        weight->scalar_type() == at::kFloat && weight->is_contiguous() && weight->numel() == p.C,
        ct3d_msg("ct3d: spatial_softmax weight must be contiguous float32 with ", p.C,
                 " elements, got ", weight->scalar_type(), " with ", weight->numel()));
    p.weight = weight->data_ptr<float>();
  }
  p.log = log ? 1 : 0;
  TORCH_CHECK(max_cluster >= 0 && max_cluster <= 8,
              ct3d_msg("ct3d: spatial_softmax max_cluster must be "
                       "in [0, 8], got ",
                       max_cluster));
  const int64_t per_cta = ct3d::spatial_softmax_onchip_elems(p.in_dtype,
                                                             static_cast<int>(shared_vecs));
  TORCH_CHECK(shared_vecs >= 0 && per_cta > 0,
              ct3d_msg("ct3d: spatial_softmax shared_vecs must be in "
                       "[0, 16], got ",
                       shared_vecs));
  if (p.rows == 0 || p.L == 0) return 0;
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  const int vec = ct3d::spatial_softmax_vec(p.in_dtype);
  const int64_t in_bytes = static_cast<int64_t>(x.element_size());
  p.vec = (p.L % vec == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(p.out) % 16 == 0) ? 1 : 0;
  int cc_major = 0;
  if (p.vec && max_cluster > 0 &&
      cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev.index()) ==
          cudaSuccess &&
      cc_major >= 9) {
    const int64_t csize = (p.L + per_cta - 1) / per_cta;
    if (csize <= max_cluster) {
      p.cluster = static_cast<int32_t>(csize);
      if (shared_vecs > 0) {  // vectors per thread for an even split of the row over csize CTAs
        const int64_t step = ct3d::spatial_softmax_onchip_elems(p.in_dtype, 1);
        p.nvec = static_cast<int32_t>(((p.L + csize - 1) / csize + step - 1) / step);
      }
      const cudaError_t err = ct3d::launch_spatial_softmax(p, stream);
      if (err == cudaSuccess) return -csize;
      (void)cudaGetLastError();  // a cluster shape the device refuses: the two kernels below
      p.cluster = 0;
      p.nvec = 0;
    }
  }
  // about 32 KB of input per CTA (8 vectors of 16 bytes per thread), at most 4096 chunks a row
  const int64_t target = 8 * 256 * (16 / in_bytes);
  int64_t chunks = std::min<int64_t>((p.L + target - 1) / target, 4096);
  int64_t chunk = (p.L + chunks - 1) / chunks;
  chunk = (chunk + vec - 1) / vec * vec;
  chunks = (p.L + chunk - 1) / chunk;
  p.chunk = chunk;
  p.chunks = static_cast<int32_t>(chunks);
  at::Tensor partial = at::empty({p.rows * chunks * 2}, x.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  const cudaError_t err = ct3d::launch_spatial_softmax(p, stream);
  TORCH_CHECK(err == cudaSuccess,
              ct3d_msg("ct3d: spatial_softmax launch failed: ", cudaGetErrorString(err), " (input ",
                       x.scalar_type(), ", output ", out.scalar_type(), ")"));
  return chunks;
}

}  // namespace

// x: contiguous NCDHW float32/float16/bfloat16; out: contiguous (N, C, D / kd, H / kh, W / kw)
// of x's dtype. avg_pool3d (max_pool3d when `max`) with kernel == stride == (kd, kh, kw) (each
// 1-8), no padding, floor mode, then `act` (0: none, else ct3d::Op OP_RELU / OP_GELU / OP_SILU
// / OP_SIGMOID / OP_TANH; act_flag 1: GELU's tanh approximation): csrc/kernels_pool_tail.cu.
void pool_tail(const at::Tensor& x, at::Tensor& out, int64_t kd, int64_t kh, int64_t kw,
               int64_t act, int64_t act_flag, bool max) {
  const at::Device dev = x.device();
  check_cuda_on(x, dev, "input");
  check_cuda_on(out, dev, "output");
  TORCH_CHECK(kd >= 1 && kd <= 8 && kh >= 1 && kh <= 8 && kw >= 1 && kw <= 8,
              ct3d_msg("ct3d: pool_tail kernel must be in [1, 8] per dimension, got (", kd, ", ",
                       kh, ", ", kw, ")"));
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous(),
              ct3d_msg("ct3d: pool_tail needs a contiguous NCDHW "
                       "input, got ",
                       dims(x.sizes()), " with strides ", dims(x.strides())));
  const std::vector<int64_t> want = {x.size(0), x.size(1), x.size(2) / kd, x.size(3) / kh,
                                     x.size(4) / kw};
  TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef(want) &&
                  out.scalar_type() == x.scalar_type(),
              ct3d_msg("ct3d: pool_tail output must be contiguous ", dims(at::IntArrayRef(want)),
                       " ", x.scalar_type(), ", got ", dims(out.sizes()), " ", out.scalar_type()));
  TORCH_CHECK(x.size(2) <= INT32_MAX && x.size(3) <= INT32_MAX && x.size(4) <= INT32_MAX,
              "ct3d: pool_tail spatial sizes must fit in 32 bits");
  ct3d::PoolTailParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.nc = x.size(0) * x.size(1);
  p.D = static_cast<int32_t>(x.size(2));
  p.H = static_cast<int32_t>(x.size(3));
  p.W = static_cast<int32_t>(x.size(4));
  p.Do = static_cast<int32_t>(want[2]);
  p.Ho = static_cast<int32_t>(want[3]);
  p.Wo = static_cast<int32_t>(want[4]);
  p.kd = static_cast<int32_t>(kd);
  p.kh = static_cast<int32_t>(kh);
  p.kw = static_cast<int32_t>(kw);
  p.dtype = dtype_code(x.scalar_type(), "input");
  p.act = static_cast<int32_t>(act);
  p.act_flag = static_cast<int32_t>(act_flag);
  p.max = max ? 1 : 0;
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const cudaError_t err = ct3d::launch_pool_tail(p, stream);
  TORCH_CHECK(err == cudaSuccess,
              ct3d_msg("ct3d: pool_tail launch failed: ", cudaGetErrorString(err)));
}

// x: contiguous NCDHW float32/float16/bfloat16 (N, C, D, H, W); out: the same shape and dtype,
// contiguous; weight, bias: undefined or (C,) float32 contiguous on x's device. GroupNorm with
// `groups` groups (C % groups == 0) and `eps`, the affine, then `act` (0: none, else ct3d::Op
// OP_RELU / OP_LEAKY_RELU (negative slope `alpha`) / OP_GELU / OP_SILU / OP_SIGMOID / OP_TANH /
// OP_HARDSWISH; act_flag 1: GELU's tanh approximation): csrc/kernels_norm_tail.cu.
void norm_tail(const at::Tensor& x, at::Tensor& out, int64_t groups,
               const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
               double eps, int64_t act, int64_t act_flag, double alpha) {
  const at::Device dev = x.device();
  check_cuda_on(x, dev, "input");
  check_cuda_on(out, dev, "output");
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous(),
              ct3d_msg("ct3d: norm_tail needs a contiguous NCDHW "
                       "input, got ",
                       dims(x.sizes()), " with strides ", dims(x.strides())));
  TORCH_CHECK(
      out.is_contiguous() && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
      ct3d_msg("ct3d: norm_tail output must be contiguous ", dims(x.sizes()), " ", x.scalar_type(),
               ", got ", dims(out.sizes()), " ", out.scalar_type()));
  const int64_t C = x.size(1);
  TORCH_CHECK(
      groups >= 1 && C >= 1 && C % groups == 0 && C <= INT32_MAX,
      ct3d_msg("ct3d: norm_tail needs C divisible by groups, got C = ", C, ", groups = ", groups));
  TORCH_CHECK(eps >= 0.0, ct3d_msg("ct3d: norm_tail eps must be >= 0, got ", eps));
  const float* ptrs[2] = {nullptr, nullptr};
  const c10::optional<at::Tensor>* affine[2] = {&weight, &bias};
  const char* names[2] = {"weight", "bias"};
  for (int i = 0; i < 2; ++i) {
    if (!affine[i]->has_value() || !(*affine[i])->defined()) continue;
    const at::Tensor& t = **affine[i];
    check_cuda_on(t, dev, names[i]);
    TORCH_CHECK(
        t.dim() == 1 && t.size(0) == C && t.is_contiguous() && t.scalar_type() == at::kFloat,
        ct3d_msg("ct3d: norm_tail ", names[i], " must be a contiguous (", C,
                 ",) float32 tensor, got ", dims(t.sizes()), " ", t.scalar_type()));
    ptrs[i] = t.data_ptr<float>();
  }
  ct3d::NormTailParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.weight = ptrs[0];
  p.bias = ptrs[1];
  p.rows = x.size(0) * C;
  p.S = x.size(2) * x.size(3) * x.size(4);
  p.C = static_cast<int32_t>(C);
  p.groups = static_cast<int32_t>(groups);
  p.dtype = dtype_code(x.scalar_type(), "input");
  TORCH_CHECK(
      p.dtype != ct3d::kF64,
      ct3d_msg("ct3d: norm_tail takes float32, float16 or bfloat16, got ", x.scalar_type()));
  const int64_t chunk = ct3d::norm_chunk(p.dtype);
  const int64_t chunks = (p.S + chunk - 1) / chunk;
  TORCH_CHECK(p.S >= 1 && p.rows * chunks < (int64_t{1} << 31),
              ct3d_msg("ct3d: norm_tail needs 1 <= N * C * ceil(D * H * W / ", chunk,
                       ") < 2^31, got ", dims(x.sizes())));
  p.chunks = static_cast<int32_t>(chunks);
  p.act = static_cast<int32_t>(act);
  p.act_flag = static_cast<int32_t>(act_flag);
  p.alpha = static_cast<float>(alpha);
  p.eps = static_cast<float>(eps);
  const int64_t esize = x.element_size();
  p.vec = (p.S % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 && esize <= 4) ? 1 : 0;
  at::Tensor partial = at::empty({p.rows * chunks * 3}, x.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({x.size(0) * groups * 2}, x.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  p.stats = stats.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const cudaError_t err = ct3d::launch_norm_tail(p, stream);
  TORCH_CHECK(
      err == cudaSuccess,
      ct3d_msg("ct3d: norm_tail launch failed: ", cudaGetErrorString(err), " (input ",
               dims(x.sizes()), " ", x.scalar_type(), ", groups ", groups, ", act ", act, ")"));
}

// The spatial dimensions of `t` (N, C, D, H, W) as one stride: *s such that element (n, c, d,
// h, w) is at n * stride(0) + c * stride(1) + ((d * H + h) * W + w) * *s (NCDHW contiguous: 1,
// channels_last_3d: C). False when they do not collapse.
bool spatial_stride(const at::Tensor& t, int64_t* s) {
  const int64_t D = t.size(2), H = t.size(3), W = t.size(4);
  const int64_t sw = W > 1 ? t.stride(4) : (H > 1 ? t.stride(3) * H : t.stride(2) * D * H);
  *s = sw;
  return (W == 1 || t.stride(4) == sw) && (H == 1 || t.stride(3) == sw * W) &&
         (D == 1 || t.stride(2) == sw * W * H);
}

// src: (N, C, D, H, W) float32 / float16 / bfloat16 (D * H * W < 2^31 - 128), the conv output
// without its bias; bias:
// (C,) contiguous or None; out: src's shape, src's dtype or float32; both NCDHW contiguous or
// channels_last_3d (any strides whose spatial dimensions collapse, spatial_stride), out may be
// src itself. The other arguments as for `launch`: the epilogue program, decoded for an output
// with out's strides; SOFTMAX and LAYER_NORM are not taken. Runs bias + program in one pass:
// csrc/kernels_epilogue_pass.cu.
// `lite`: the vector kernels (csrc/ct3d_pass_lite.cuh): 0 never, 1 where they are faster (the
// rule below), 2 / 3 (measurements) every channels_last_3d -> NCDHW pass with scalar / 16-byte
// output stores where the tensors allow them. Returns the kernel that ran
// (ct3d::PassKernel: 0 none (empty output), 1 plain, 2 staged, 3 vector same layout, 4 vector
// channels_last_3d -> NCDHW).
int64_t epilogue_pass(const at::Tensor& src, const c10::optional<at::Tensor>& bias,
                      at::Tensor& out, const std::vector<at::Tensor>& slots,
                      const at::Tensor& slot_strides, const at::Tensor& prog_i,
                      const at::Tensor& prog_f, const std::vector<int64_t>& regs,
                      int64_t lite) {
  const at::Device dev = src.device();
  check_cuda_on(src, dev, "epilogue_pass source");
  check_cuda_on(out, dev, "epilogue_pass output");
  TORCH_CHECK(src.dim() == 5 && out.sizes() == src.sizes(),
              ct3d_msg("ct3d: epilogue_pass needs a 5-D "
                       "source and an output of its shape, got ",
                       dims(src.sizes()), " and ", dims(out.sizes())));
  for (int64_t v : src.sizes()) {
    TORCH_CHECK(v <= INT32_MAX, "ct3d: epilogue_pass dimension too large");
  }
  ct3d::EpiPassParams p;
  std::memset(&p, 0, sizeof(p));
  p.src_dtype = dtype_code(src.scalar_type(), "epilogue_pass source");
  p.out_dtype = dtype_code(out.scalar_type(), "epilogue_pass output");
  TORCH_CHECK(
      p.src_dtype != ct3d::kF64 && (p.out_dtype == p.src_dtype || p.out_dtype == ct3d::kF32),
      ct3d_msg("ct3d: epilogue_pass takes a float32, float16 or bfloat16 source and an output of "
               "its dtype or float32, got ",
               src.scalar_type(), " -> ", out.scalar_type()));
  TORCH_CHECK(
      spatial_stride(src, &p.ss_s) && spatial_stride(out, &p.os_s),
      ct3d_msg("ct3d: epilogue_pass needs NCDHW-contiguous or channels_last_3d tensors, got "
               "strides ",
               dims(src.strides()), " and ", dims(out.strides())));
  p.src = src.data_ptr();
  p.ss_n = src.stride(0);
  p.ss_c = src.stride(1);
  p.src_cfast = p.ss_c == 1 && src.size(1) > 1;
  p.out = out.data_ptr();
  p.os_n = out.stride(0);
  p.os_c = out.stride(1);
  p.out_cfast = p.os_c == 1 && out.size(1) > 1;
  p.N = static_cast<int32_t>(src.size(0));
  p.C = static_cast<int32_t>(src.size(1));
  p.D = static_cast<int32_t>(src.size(2));
  p.H = static_cast<int32_t>(src.size(3));
  p.W = static_cast<int32_t>(src.size(4));
  p.S = src.size(2) * src.size(3) * src.size(4);
  TORCH_CHECK(p.S < (int64_t{1} << 31) - 128,
              ct3d_msg("ct3d: epilogue_pass needs D * H * W < 2^31 - "
                       "128, got ",
                       p.S));
  // the staged kernel copies the source in 4-byte units of 4 / element_size elements along its
  // fast dimension (stride 1): every unit must start 4-byte aligned and lie in one row
  {
    const int64_t esize = src.element_size();
    const bool aligned = reinterpret_cast<uintptr_t>(src.data_ptr()) % 4 == 0;
    if (esize == 4) {
      p.staged = aligned ? 1 : 0;
    } else if (esize == 2 && aligned && p.src_cfast) {
      p.staged = (p.C % 2 == 0 && p.ss_n % 2 == 0 && p.ss_s % 2 == 0) ? 1 : 0;
    } else if (esize == 2 && aligned && p.ss_s == 1) {
      p.staged = (p.S % 2 == 0 && p.ss_n % 2 == 0 && p.ss_c % 2 == 0) ? 1 : 0;
    }
  }
  if (bias.has_value() && bias->defined()) {
    check_cuda_on(*bias, dev, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == p.C && bias->is_contiguous(),
                ct3d_msg("ct3d: bias must be contiguous 1-D with ", p.C, " elements, got shape ",
                         dims(bias->sizes())));
    p.bias = bias->data_ptr();
    p.bias_dtype = dtype_code(bias->scalar_type(), "bias");
  }
  const int64_t ys[5] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                         out.stride(4)};
  fill_epilogue(p.epi, dev, ys, slots, slot_strides, prog_i, prog_f, regs, 1, 0);
  // a size-1 output dimension's index is always 0: its slot strides are set to 0 (so a
  // (C, 1, 1, 1) tensor counts as per-channel at N == 1) and like_y compares the others
  for (int i = 0; i < p.epi.n_slots; ++i) {
    ct3d::Slot& sl = p.epi.slot[i];
    bool like = true;
    for (int j = 0; j < 5; ++j) {
      if (out.size(j) == 1) {
        sl.s[j] = 0;
      } else {
        like = like && sl.s[j] == ys[j];
      }
    }
    sl.like_y = like ? 1 : 0;
  }
  // 16-byte units along the fast dimension (stride 1): the extent there and the other strides
  // multiples of 16 / element_size, the data 16-byte aligned
  auto vec16 = [&](const void* ptr, int64_t esize, bool cfast, int64_t sn, int64_t sc,
                   int64_t ss) {
    const int64_t v = 16 / esize;
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || sn % v != 0) return false;
    return cfast ? (p.C % v == 0 && ss % v == 0) : (ss == 1 && p.S % v == 0 && sc % v == 0);
  };
  p.vec_src = p.staged && vec16(p.src, src.element_size(), p.src_cfast, p.ss_n, p.ss_c, p.ss_s);
  p.vec_out = vec16(p.out, out.element_size(), p.out_cfast, p.os_n, p.os_c, p.os_s);
  // the staged kernel also stages the first full-size slot laid out like the output (like_y)
  // with the source's dtype, where it too splits into 4-byte units (as the source above)
  p.side_slot = -1;
  for (int i = 0; p.staged && i < p.epi.n_slots; ++i) {
    const ct3d::Slot& sl = p.epi.slot[i];
    const bool fits =
        sl.like_y == 1 && sl.dtype == p.src_dtype &&
        reinterpret_cast<uintptr_t>(sl.ptr) % 4 == 0 &&
        (src.element_size() == 4 ||
         (p.out_cfast ? (p.C % 2 == 0 && p.os_n % 2 == 0 && p.os_s % 2 == 0)
                      : (p.os_s == 1 && p.S % 2 == 0 && p.os_n % 2 == 0 && p.os_c % 2 == 0)));
    if (fits) {
      p.epi.slot[i].like_y = 2;
      p.side_slot = i;
      p.vec_side = vec16(sl.ptr, src.element_size(), p.out_cfast, p.os_n, p.os_c, p.os_s);
      break;
    }
  }
  TORCH_CHECK(!ct3d::epilogue_spans_w(p.epi) && !ct3d::epilogue_spans_channels(p.epi),
              "ct3d: epilogue_pass does not run SOFTMAX or LAYER_NORM");
  // the vector kernels: 8 elements along each tensor's fast dimension (stride 1) in 16-byte
  // vectors: that extent and the other strides multiples of 8, both pointers 16-byte aligned;
  // channels_last_3d -> NCDHW also with scalar stores where only the source allows vectors
  {
    constexpr int64_t E = ct3d::kLiteE;
    const bool src_al = reinterpret_cast<uintptr_t>(p.src) % 16 == 0;
    const bool al = src_al && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
    const bool src_cl = p.src_cfast && p.C % E == 0 && p.ss_n % E == 0 && p.ss_s % E == 0;
    const bool src_nc = !p.src_cfast && p.ss_s == 1 && p.S % E == 0 && p.ss_n % E == 0 &&
                        p.ss_c % E == 0;
    const bool out_cl = p.out_cfast && p.C % E == 0 && p.os_n % E == 0 && p.os_s % E == 0;
    const bool out_nc = !p.out_cfast && p.os_s == 1 && p.S % E == 0 && p.os_n % E == 0 &&
                        p.os_c % E == 0;
    const bool vec_t = al && src_cl && out_nc;  // the transpose with 16-byte output stores
    const bool scalar_t = src_al && src_cl && !p.out_cfast && p.os_s == 1;
    if (lite <= 0) {
      p.lite = ct3d::kLiteOff;
    } else if (al && ((src_cl && out_cl) || (src_nc && out_nc))) {
      p.lite = ct3d::kLiteSame;
    } else if (lite == 2) {  // measurement: scalar output stores wherever the transpose runs
      p.lite = scalar_t ? ct3d::kLiteTransposeScalarOut : ct3d::kLiteOff;
    } else if (lite == 3 || out.element_size() == 2) {  // half outputs: 16-byte stores
      p.lite = vec_t ? ct3d::kLiteTranspose
               : scalar_t ? ct3d::kLiteTransposeScalarOut : ct3d::kLiteOff;
    } else {
      // float32 outputs (H200, scripts/pass_time.py, docs/kernel.md): the scalar-store form
      // ran at 3.2-3.9 TB/s, 1.2-1.7x the staged kernel, and the 16-byte-store form at
      // 2.8-3.0 TB/s (~10% below the staged kernel)
      p.lite = scalar_t ? ct3d::kLiteTransposeScalarOut : ct3d::kLiteOff;
    }
  }
  if (out.numel() == 0) return ct3d::kPassNone;
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  int kernel = ct3d::kPassNone;
  const cudaError_t err = ct3d::launch_epilogue_pass(p, stream, &kernel);
  TORCH_CHECK(err == cudaSuccess,
              ct3d_msg("ct3d: epilogue_pass launch failed: ", cudaGetErrorString(err)));
  return kernel;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ct3d_fx fused ConvTranspose3d + epilogue CUDA kernel";
  m.def("launch", &launch, "Launch the fused kernel (see csrc/binding.cpp)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("slots"), py::arg("slot_strides"),
        py::arg("prog_i"), py::arg("prog_f"), py::arg("regs"), py::arg("conv"), py::arg("mode"),
        py::arg("algo"));
  m.def("launch_igemm", &launch_igemm, "Launch the channels-last implicit GEMM (see "
        "csrc/binding.cpp)", py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"),
        py::arg("slots"), py::arg("slot_strides"), py::arg("prog_i"), py::arg("prog_f"),
        py::arg("regs"), py::arg("conv"), py::arg("wpk"), py::arg("ck"), py::arg("bn"),
        py::arg("config"), py::arg("bm") = 128, py::arg("splits") = 1);
  m.def("spatial_softmax", &spatial_softmax, "Softmax over the spatial positions of each (n, c) "
        "row, times a per-channel weight (see csrc/binding.cpp)", py::arg("x"), py::arg("out"),
        py::arg("weight"), py::arg("log"), py::arg("max_cluster") = 8,
        py::arg("shared_vecs") = 16);
  m.def("pool_tail", &pool_tail, "avg_pool3d or max_pool3d (kernel == stride, no padding) then "
        "an activation (see csrc/binding.cpp)", py::arg("x"), py::arg("out"), py::arg("kd"),
        py::arg("kh"), py::arg("kw"), py::arg("act"), py::arg("act_flag"),
        py::arg("max") = false);
  m.def("norm_tail", &norm_tail, "GroupNorm (affine) then an activation over a contiguous "
        "NCDHW tensor (see csrc/binding.cpp)", py::arg("x"), py::arg("out"), py::arg("groups"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("act"), py::arg("act_flag"),
        py::arg("alpha"));
  m.def("epilogue_pass", &epilogue_pass, "A site's bias and epilogue program in one pass over a "
        "conv output computed elsewhere (see csrc/binding.cpp)", py::arg("src"), py::arg("bias"),
        py::arg("out"), py::arg("slots"), py::arg("slot_strides"), py::arg("prog_i"),
        py::arg("prog_f"), py::arg("regs"), py::arg("lite") = 1);
  m.attr("MAX_INSTR") = ct3d::kMaxInstr;
  m.attr("MAX_SLOTS") = ct3d::kMaxSlots;
  m.attr("MAX_REGS") = ct3d::kMaxRegs;
}
