"""CUDA implementation of ``ct3d::conv_transpose3d_epilogue`` (registered for "cuda").

One kernel launch computes the transposed convolution and the whole epilogue program and
writes the output once (csrc/ct3d_conv.cuh, csrc/ct3d_igemm.cuh; the channels-last GEMM is
preceded by one launch that packs the input). This module decides per call whether the kernel
covers the call, allocates the output exactly as the fake kernel describes it (shape, strides,
dtype: ``torch.library.opcheck`` compares them), decodes the program for the kernel and
launches it. Everything that depends only on the call's signature (shapes, strides, dtypes,
devices, conv parameters, program, scalars) is computed once and cached, so the hot path is a
dictionary lookup, a weight repack and the launch.

Kernels: for groups == 1 on tensor cores the channels-last implicit GEMM
(csrc/ct3d_igemm.cuh: the input is first copied into a zero-padded NDHWC scratch tensor, the
weight repacked and cached, then one GEMM kernel with the epilogue), else the strided-input
GEMM or the direct kernel of csrc/ct3d_conv.cuh (``ALGO`` and ``_igemm_rule``).

Precision: float32 follows ``torch.backends.cudnn.allow_tf32`` (True: TF32 tensor cores,
False: exact FP32 FFMA); float16/bfloat16 use tensor cores; all accumulate in FP32 and run the
epilogue in FP32 registers, rounding once to the result dtype. Shapes with few input channels
per group (e.g. C_in = 3; W stride 1 or 2; the rule is csrc/ct3d_conv.cuh ``direct_pays``) run
a direct kernel instead, exact FP32 FFMA in every precision (inputs converted to float): there
the tensor cores would mostly multiply padding (``ALGO`` selects the kernel for tests). Its
staged-input form (each tile's input rows copied to shared memory first) runs only where forced
(``ALGO = "direct_staged"``) or where ``DIRECT_STAGED_AUTO`` lets "auto" pick it (H200, v24:
l1_72 0.574 -> 0.547 ms in TF32, so off by default).

Limitations (these calls run the reference, ``ops.reference``):
    * the extension is unavailable (see ``_build.why_not()``);
    * float64 input, or a result dtype other than float32/float16/bfloat16 (e.g. a float64
      side input that promotes the result);
    * an extra tensor that is not floating point, or that enlarges the output by broadcasting;
    * PReLU weights or BatchNorm statistics that are not 1-D device tensors of C (PReLU: 1
      or C) elements;
    * more than ``MAX_INSTR`` instructions or ``MAX_SLOTS`` epilogue tensors;
    * more than ``MAX_REGS`` epilogue values alive at once;
    * a softmax over the channels (SOFTMAX) with groups > 1 or more than
      ``SOFTMAX_MAX_CHANNELS`` output channels (the pass does not fuse those);
    * a LayerNorm over W (LAYER_NORM) unless the W-line tiles hold the call's W lines: groups
      == 1, W stride 1 or 2, W_out a multiple of the W stride and W_out / W stride <=
      ``WLINE_MAX_ROWS``, tensor cores (float32 with TF32 allowed, float16, bfloat16), LayerNorm
      weight and bias 1-D device tensors of W_out elements. Outside these limits and in exact
      FP32 the call is cut at the LayerNorm (``_layernorm_split``): the kernel runs the conv
      and the instructions before it, PyTorch the rest; only where an instruction after the
      LayerNorm reads a computed value from before it does the whole call run the reference;
    * grids beyond CUDA's limits: groups * ceil(C_out/groups / 16) > 65535, or more than
      2^31 - 1 tiles of 64 output voxels (all stride phases together).
"""
from __future__ import annotations

import contextlib
import math
import operator
import os
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _build, ops, subpixel
from .ops import (INSTR_WIDTH, Opcode, _triple, check_args, conv_transpose3d_epilogue,
                  output_shape, reference)

__all__ = ["POISON_OUTPUT", "fallback_reason", "MAX_INSTR", "MAX_SLOTS", "MAX_REGS",
           "SOFTMAX_MAX_CHANNELS"]

#: Test hook: when True, every output is filled with NaN before the kernel launches, so a test
#: can check that the kernel wrote every element.
POISON_OUTPUT = False

#: Which kernel runs: "auto" (by shape: the channels-last implicit GEMM, csrc/ct3d_igemm.cuh,
#: for groups == 1 on tensor cores unless the direct kernel's rule holds; otherwise
#: csrc/ct3d_conv.cuh launch_conv picks the direct FP32 kernel for few input channels per group
#: or the strided-input implicit GEMM), "igemm" (wherever it applies: tensor cores, groups ==
#: 1, 32-bit offsets), "gemm", "direct" (where the direct kernel applies: W stride 1 or 2,
#: the phase's weights within 64 KB; else the GEMM) or "direct_staged" (the direct kernel's
#: staged-input form where it applies: C_in/groups <= 16, its shared memory within 160 KB;
#: else as "direct"). Tests and timing scripts set it; the environment variable CT3D_FX_ALGO
#: gives the default.
ALGO = os.environ.get("CT3D_FX_ALGO", "auto")
_ALGO_CODE = {"auto": 0, "gemm": 1, "direct": 2, "igemm": 0, "direct_staged": 3}
#: Whether "auto" may pick the direct kernel's staged-input form (csrc/ct3d_conv.cuh
#: ``direct_staged_pays``: 5 to 16 input channels per group where the direct kernel is picked).
#: Off by default (its first H200 timing, v24: l1_72 5% faster in TF32, slower on the C_in = 3
#: rows it does not take; docs/kernel.md, Next); the environment variable CT3D_FX_DIRECT_STAGED=1
#: turns it on. Read at each launch.
DIRECT_STAGED_AUTO = os.environ.get("CT3D_FX_DIRECT_STAGED", "0") == "1"
_ALGO_AUTO_STAGED = 4  # csrc/ct3d_params.h kAlgoAutoStaged

#: Tile configurations of the channels-last implicit GEMM, by id: (bytes per K step, BM, BN,
#: warps). Mirrors csrc/ct3d_igemm.cuh ``launch_igemm``: 0-10 tile BM consecutive voxels of a
#: phase; 11-17 (``IGEMM_BOX_CONFIGS``) tile a box of BM = 128 voxels and read its input patch
#: once per K chunk for all taps (falling back to a row tile of the same K step and BN when the
#: patch does not fit in shared memory); 19-24 are their wgmma forms, 25-26 the W-line tiles
#: (``IGEMM_WLINE_CONFIGS``).
IGEMM_CONFIGS = {
    0: (128, 128, 64, 4), 1: (128, 128, 32, 4), 2: (128, 128, 16, 4),
    3: (64, 128, 64, 4), 4: (64, 128, 32, 4), 5: (64, 128, 16, 4),
    6: (128, 128, 128, 8), 7: (64, 256, 64, 8), 8: (64, 128, 128, 8),
    9: (64, 128, 64, 4), 10: (128, 128, 64, 4),
    11: (128, 128, 64, 4), 12: (64, 128, 32, 4), 13: (64, 128, 64, 4), 14: (128, 128, 64, 4),
    15: (64, 128, 16, 4), 16: (64, 128, 128, 8), 17: (128, 128, 32, 4),
    18: (128, 64, 64, 4),
    19: (64, 128, 64, 4), 20: (64, 128, 128, 4), 21: (128, 128, 64, 4),
    22: (64, 256, 64, 8), 23: (128, 256, 64, 8), 24: (64, 256, 128, 8),
    25: (128, 64, 64, 4), 26: (64, 64, 64, 4),
    27: (64, 256, 64, 8), 28: (128, 256, 128, 8),
}
IGEMM_BOX_CONFIGS = tuple(range(11, 18))
#: Box tiles on Hopper's warpgroup MMA (csrc/ct3d_wgmma.cuh, sm_90a): a 2 x 8 x 8 (19-21, one
#: warpgroup) or 4 x 8 x 8 (22-24, two) box of one phase, operands read by wgmma.mma_async
#: straight from shared memory. On a device other than compute capability 9.0 each runs the
#: mma.sync box configuration of the same K step and BN (19, 22 -> 13; 20, 24 -> 16;
#: 21, 23 -> 11).
IGEMM_WGMMA_CONFIGS = (19, 20, 21, 22, 23, 24, 27, 28)
#: The wgmma boxes with the bulk-copy B ring (v24, csrc/ct3d_wgmma.cuh
#: conv_transpose3d_igemm_wgmma_bulk_kernel; 4 x 8 x 8 boxes on two warpgroups): each K chunk's B
#: tile of a tap is one cp.async.bulk copy of a blocked weight (``_packed_weight_wgmma_bulk``)
#: completing on an mbarrier, the warpgroups synchronized by mbarriers instead of a CTA barrier
#: per tap. 27: BN 64, 64-byte chunks, 8 stages, 2 CTAs per multiprocessor; 28: BN 128,
#: 128-byte chunks, 4 stages. Their blocked weight fits no other kernel, so where one cannot run
#: (off compute capability 9.0, split-K, a patch or epilogue too large for shared memory) nothing
#: is launched and the call repacks the weight and runs ``_BULK_FALLBACK``'s configuration (same
#: K step and BN) from then on.
IGEMM_WGMMA_BULK_CONFIGS = (27, 28)
_BULK_FALLBACK = {27: 22, 28: 6}
#: W-line tiles (csrc/ct3d_igemm.cuh conv_transpose3d_igemm_wline_kernel): 64 voxels of each W
#: phase (W stride 1 or 2) x 64 channels, whole W lines of the output in one tile; the only
#: configurations that run a LAYER_NORM over W. BM in ``IGEMM_CONFIGS`` is the rows per phase.
IGEMM_WLINE_CONFIGS = (25, 26)
#: Longest W line (W_out / W stride) a W-line tile holds per phase.
WLINE_MAX_ROWS = 64
#: The row-tile configuration of the same K step and BN as each box configuration (the
#: fallback of csrc/ct3d_igemm.cuh launch_igemm; split-K runs on row tiles).
_BOX_FALLBACK = {11: 0, 12: 4, 13: 3, 14: 0, 15: 5, 16: 8, 17: 1, 19: 3, 20: 8, 21: 0, 22: 3,
                 23: 0, 24: 8, 27: 3, 28: 6}
#: Split-K override for the channels-last implicit GEMM's row tiles (None: by shape,
#: ``_igemm_splits``). Read when a call signature is first planned. For tests.
IGEMM_SPLITS: Optional[int] = None
_IGEMM_MAX_STRIDE = 8  # csrc/ct3d_params.h kMaxStride: the kernel tabulates the stride phases

#: Configuration override for the channels-last implicit GEMM (an ``IGEMM_CONFIGS`` id); None
#: picks by shape (``_igemm_config``). Read when a call signature is first planned. For timing
#: scripts.
IGEMM_CONFIG: Optional[int] = None

#: The kernel the last launch ran: "gemm", "direct", "direct_staged", "igemm", or None
#: (nothing launched yet, or an empty output). For tests.
LAST_KERNEL: Optional[str] = None
#: Whether the last channels-last GEMM launch ran the sm_90a wgmma kernel. For tests.
LAST_WGMMA: bool = False
#: Whether that was the bulk-copy form (``IGEMM_WGMMA_BULK_CONFIGS``). For tests.
LAST_WGMMA_BULK: bool = False

MAX_INSTR = 48  # csrc/ct3d_params.h kMaxInstr
MAX_SLOTS = 16  # csrc/ct3d_params.h kMaxSlots
MAX_REGS = 6  # csrc/ct3d_params.h kMaxRegs
#: Output channels a SOFTMAX epilogue may span (csrc/ct3d_params.h kMaxSoftmaxChannels): each
#: kernel then computes all of a voxel's channels in one tile (groups == 1).
SOFTMAX_MAX_CHANNELS = 64
_MAX_GRID_X, _MAX_GRID_Y = 2 ** 31 - 1, 65535
_PASS_MAX_SPATIAL = 2 ** 31 - 128  # D * H * W the epilogue pass takes (csrc/binding.cpp)
_PASS_MIN_CHANNELS = 8  # C_out below which the autotune does not time the pass candidates
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SLOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MODE_FFMA, _MODE_TENSOR_CORE = 0, 1


def _collapses(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether a 5-D tensor's spatial dimensions collapse to one stride (NCDHW contiguous,
    channels_last_3d): the layouts the epilogue pass reads and writes (binding.cpp
    ``spatial_stride``)."""
    D, H, W = shape[2:]
    sw = stride[4] if W > 1 else (stride[3] * H if H > 1 else stride[2] * D * H)
    return ((W == 1 or stride[4] == sw) and (H == 1 or stride[3] == sw * W)
            and (D == 1 or stride[2] == sw * W * H))


_UNARY = {Opcode.NEG, Opcode.ABS, Opcode.SQUARE, Opcode.RELU, Opcode.SELU, Opcode.SILU,
          Opcode.MISH, Opcode.HARDSWISH, Opcode.HARDSIGMOID, Opcode.SIGMOID, Opcode.TANH}
_BINARY = {Opcode.ADD, Opcode.SUB, Opcode.MUL, Opcode.DIV}
_ONE_SCALAR = {Opcode.LEAKY_RELU, Opcode.ELU, Opcode.CELU}
_TWO_SCALARS = {Opcode.HARDTANH, Opcode.SOFTPLUS}


class _Plan:
    """What a call signature needs: output allocation and the decoded program, or why not."""

    __slots__ = ("fallback", "shape", "stride", "dtype", "slot_extras", "slot_strides",
                 "prog_i", "prog_f", "patches", "regs", "conv", "igemm_ok", "igemm_auto",
                 "igemm_tiles", "wline", "ln_split", "checked", "passable")

    def __init__(self, fallback: Optional[str] = None):
        self.fallback = fallback
        self.checked = False  # ops.check_args passed on this call signature (run())
        self.wline = False  # a LAYER_NORM over W: the W-line tiles only (tensor cores)
        self.passable = False  # the epilogue pass can run the program (_pass_applies)
        # (prefix, suffix) programs (_layernorm_split) where the LayerNorm is what keeps the
        # call off the kernel: the kernel runs the prefix, PyTorch the suffix
        self.ln_split: Optional[Tuple[List[int], List[int]]] = None


_plans: Dict[tuple, _Plan] = {}
_PLANS_MAX = 512


def _sig(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device)  # (torch.Size hashes as a tuple)


def _key(input, weight, bias, stride, padding, output_padding, dilation, groups, program,
         scalars, extras) -> tuple:
    return (_sig(input), _sig(weight), None if bias is None else _sig(bias), tuple(stride),
            tuple(padding), tuple(output_padding), tuple(dilation), groups, tuple(program),
            tuple(scalars), tuple(_sig(t) for t in extras))


def _fake_result(input, weight, bias, stride, padding, output_padding, dilation, groups,
                 program, scalars, extras) -> Tuple[tuple, tuple, torch.dtype]:
    """Shape, strides and dtype the fake kernel gives (the reference under FakeTensorMode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        mode = FakeTensorMode()
        fake = mode.from_tensor
        args = (fake(input), fake(weight), None if bias is None else fake(bias))
        fextras = [fake(t) for t in extras]
        with mode:
            out = reference(*args, list(stride), list(padding), list(output_padding),
                            list(dilation), groups, list(program), list(scalars), fextras)
        return tuple(out.shape), tuple(out.stride()), out.dtype


def _expanded_strides(t: torch.Tensor, shape: Sequence[int]) -> List[int]:
    """Strides of ``t`` broadcast to ``shape`` (0 on broadcast dimensions)."""
    view = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return list(view.expand(tuple(shape)).stride())


def _channel_strides(t: torch.Tensor, channels: int, allow_one: bool) -> Optional[List[int]]:
    """Strides reading a per-channel vector along dim 1, or None when ``t`` is not one."""
    if t.numel() == 1 and allow_one:
        return [0, 0, 0, 0, 0]
    if t.dim() != 1 or t.numel() != channels:
        return None
    return [0, t.stride(0), 0, 0, 0]


def _make_plan(input, weight, bias, stride, padding, output_padding, dilation, groups, program,
               scalars, extras) -> _Plan:
    if input.dtype not in _KERNEL_DTYPES:
        return _Plan(f"input dtype {input.dtype} is not covered by the kernel (float32, "
                     f"float16, bfloat16)")
    n_instr = len(program) // INSTR_WIDTH
    if n_instr > MAX_INSTR:
        return _Plan(f"the epilogue has {n_instr} instructions, the kernel takes at most "
                     f"{MAX_INSTR}")
    for i, t in enumerate(extras):
        if not t.dtype.is_floating_point:
            return _Plan(f"extras[{i}] has dtype {t.dtype}, not floating point")
        if t.dtype not in _SLOT_DTYPES:
            return _Plan(f"extras[{i}] has dtype {t.dtype}, not covered by the kernel")
    st = _triple("stride", stride)
    pa = _triple("padding", padding)
    di = _triple("dilation", dilation)
    conv_shape = tuple(output_shape(input, weight, stride, padding, output_padding, dilation,
                                    groups))
    cout_g = weight.size(1)
    m_max = conv_shape[0] * math.prod(-(-o // s) for o, s in zip(conv_shape[2:], st))
    if (-(-m_max // 64) * st[0] * st[1] * st[2] > _MAX_GRID_X
            or groups * -(-cout_g // 16) > _MAX_GRID_Y):
        return _Plan("the launch grid would exceed CUDA's limits")
    try:
        shape, strides, dtype = _fake_result(input, weight, bias, stride, padding,
                                             output_padding, dilation, groups, program, scalars,
                                             extras)
    except Exception as e:  # the reference will raise the real error
        return _Plan(f"the output could not be inferred ({type(e).__name__}: {e})")
    if shape != conv_shape:
        return _Plan(f"the result shape {shape} differs from the convolution output "
                     f"{conv_shape} (an extra tensor enlarges it by broadcasting)")
    if dtype not in _KERNEL_DTYPES:
        return _Plan(f"the result dtype {dtype} is not covered by the kernel")

    channels = conv_shape[1]
    spans = any(program[i] == Opcode.SOFTMAX for i in range(0, len(program), INSTR_WIDTH))
    if spans and (groups != 1 or channels > SOFTMAX_MAX_CHANNELS):
        return _Plan(f"a softmax over the channels needs groups == 1 and at most "
                     f"{SOFTMAX_MAX_CHANNELS} output channels in the kernel, got groups={groups} "
                     f"and C_out={channels}")
    try:
        decoded = _decode_program(input, program, scalars, extras, conv_shape, channels)
    except _NotCovered as e:
        return _Plan(str(e))
    rows, slot_extras, slot_strides, alias = decoded
    try:
        rows, n_regs, out_reg = _allocate_registers(rows, alias.get(n_instr, n_instr))
    except _NotCovered as e:
        return _Plan(str(e))
    if len(rows) > MAX_INSTR:
        return _Plan(f"the decoded epilogue has {len(rows)} instructions, the kernel takes at "
                     f"most {MAX_INSTR}")
    if len(slot_extras) > MAX_SLOTS:
        return _Plan(f"the epilogue reads {len(slot_extras)} tensors, the kernel takes at most "
                     f"{MAX_SLOTS}")

    plan = _Plan()
    plan.shape, plan.stride, plan.dtype = shape, strides, dtype
    plan.slot_extras = slot_extras
    plan.slot_strides = torch.tensor(slot_strides, dtype=torch.int64).reshape(-1, 5)
    plan.prog_i = torch.tensor([r.ints() for r in rows], dtype=torch.int32).reshape(-1, 5)
    plan.prog_f = torch.tensor([[r.f0, r.f1] for r in rows], dtype=torch.float32).reshape(-1, 2)
    plan.patches = [(i, field, idx) for i, r in enumerate(rows) for field, idx in r.patches]
    plan.regs = [n_regs, out_reg]
    plan.conv = [*st, *pa, *di, int(groups)]
    plan.igemm_ok, plan.igemm_auto, plan.igemm_tiles = _igemm_rule(input, weight, conv_shape,
                                                                   st, pa, di, groups, n_regs)
    # the pass's tiles hold 32 channels: below _PASS_MIN_CHANNELS most of each tile is idle (the
    # GAN's 1-channel last layer would use 1/32 of it)
    plan.passable = (not spans and not any(program[i] == Opcode.LAYER_NORM
                                           for i in range(0, len(program), INSTR_WIDTH))
                     and _collapses(shape, strides) and channels >= _PASS_MIN_CHANNELS
                     and math.prod(shape[2:]) < _PASS_MAX_SPATIAL)
    if spans and plan.igemm_ok and plan.igemm_tiles[1] < channels:
        # a configuration forced by IGEMM_CONFIG whose tile holds fewer channels: the softmax
        # needs them all, which launch_conv's kernels provide
        plan.igemm_ok = plan.igemm_auto = False
    if any(program[i] == Opcode.LAYER_NORM for i in range(0, len(program), INSTR_WIDTH)):
        why = _wline_reason(input, conv_shape, st, groups)
        if why is None:
            tiles = _wline_tiles(input, weight, conv_shape, st, pa, di)
            if tiles is None:
                why = "the operands exceed the channels-last GEMM's 32-bit offsets"
        split = _layernorm_split(program)  # where the kernel cannot run the LayerNorm
        if why is not None:
            plan = _Plan(f"a LayerNorm over W {why}")
            plan.ln_split = split
            return plan
        plan.wline = True
        plan.ln_split = split  # for exact FP32 (no W-line tiles there)
        plan.igemm_ok = plan.igemm_auto = True
        plan.igemm_tiles = tiles
    return plan


def _layernorm_split(program: Sequence[int]) -> Optional[Tuple[List[int], List[int]]]:
    """The program cut at its first LAYER_NORM, for calls whose LayerNorm the kernel cannot run.

    Returns (prefix, suffix): ``prefix`` computes the LayerNorm's operand from the conv output
    (its result; a trailing DETACH names it when it is not the last value), ``suffix`` the
    LayerNorm and every instruction after it, renumbered so that its value 0 is that operand.
    ``reference``'s program on ``y`` equals ``suffix`` run on ``prefix``'s result. None when the
    program has no LAYER_NORM, or when an instruction from the LayerNorm on reads a value
    computed before it other than the operand (LOAD_SCALAR and LOAD_TENSOR values are loaded
    again in the suffix).
    """
    rows = ops._split(program)
    k = next((i for i, r in enumerate(rows) if r[0] == Opcode.LAYER_NORM), None)
    if k is None:
        return None
    operand = rows[k][1]
    prefix = [v for r in rows[:k] for v in r]
    if operand != k:  # value k is the last instruction's; else name the operand
        prefix += [int(Opcode.DETACH), operand, -1, -1, -1, -1]
    loads = {}  # value before the LayerNorm defined by a load -> its number in the suffix
    suffix: List[List[int]] = []
    renumber = {operand: 0}

    def value(v: int) -> int:  # v <= k: a value from before the LayerNorm
        if v in renumber:
            return renumber[v]
        r = rows[v - 1] if v >= 1 else None
        if r is None or r[0] not in (Opcode.LOAD_SCALAR, Opcode.LOAD_TENSOR):
            raise LookupError(v)  # a computed value from before the LayerNorm
        if v not in loads:
            suffix.append(list(r))
            loads[v] = len(suffix)
        return loads[v]

    try:
        for j in range(k, len(rows)):
            r = list(rows[j])
            for f, kind in enumerate(ops._FIELDS[Opcode(r[0])], start=1):
                if kind == "v":
                    r[f] = value(r[f]) if r[f] <= k else renumber[r[f]]
            suffix.append(r)
            renumber[j + 1] = len(suffix)
    except LookupError:
        return None
    return prefix, [v for r in suffix for v in r]


def _run_split(args: tuple, split: Tuple[List[int], List[int]]) -> torch.Tensor:
    """``args``' call as the fused call of the prefix program, then the suffix in PyTorch."""
    prefix, suffix = split
    y = run(args[:8] + (prefix,) + args[9:])
    return ops._run_program(y, suffix, args[9], args[10])


def _wline_reason(input, conv_shape, st, groups) -> Optional[str]:
    """Why the W-line tiles cannot run this call (phrased to follow "a LayerNorm over W"), or
    None."""
    w_out = conv_shape[4]
    if groups != 1:
        return f"needs groups == 1 in the kernel, got groups={groups}"
    if max(st) > _IGEMM_MAX_STRIDE:
        return f"needs strides up to {_IGEMM_MAX_STRIDE} in the kernel, got {st}"
    if st[2] not in (1, 2):
        return f"needs a W stride of 1 or 2 in the kernel, got {st[2]}"
    if w_out % st[2]:
        return f"needs an even W_out with W stride 2 in the kernel, got W_out={w_out}"
    if w_out // st[2] > WLINE_MAX_ROWS:
        return (f"needs W_out <= {WLINE_MAX_ROWS * st[2]} with W stride {st[2]} in the kernel "
                f"(a tile holds whole W lines), got W_out={w_out}")
    return None


def _wline_tiles(input, weight, conv_shape, st, pa, di):
    """(ck, bn, config, bm, splits) of the W-line tiles for this call, or None when the operands
    do not fit the channels-last GEMM's 32-bit offsets. 128-byte K steps when C_in fills them
    (config 25), else 64-byte ones (26); ``IGEMM_CONFIG`` may force either."""
    cin = weight.size(0)
    elem = input.element_size()
    config = (IGEMM_CONFIG if IGEMM_CONFIG in IGEMM_WLINE_CONFIGS
              else 25 if (cin * elem) % 128 == 0 else 26)
    kbytes, bm, bn, _ = IGEMM_CONFIGS[config]
    ck = kbytes // elem
    if not _igemm_fits(input, weight, conv_shape, st, pa, di, ck, bn):
        return None
    return ck, bn, config, bm, 1


def _igemm_fits(input, weight, conv_shape, st, pa, di, ck, bn) -> bool:
    """Whether the channels-last GEMM's packed input (zero halo, C_in padded to ``ck``) and
    packed weight (C_out padded to ``bn``) fit its 32-bit byte offsets, and its C_out tiles the
    grid's y dimension."""
    elem = input.element_size()
    cp = -(-weight.size(0) // ck) * ck
    ks = weight.shape[2:]
    vox = input.size(0)
    for i in range(3):
        lo, hi = _phase_halo(input.size(2 + i), conv_shape[2 + i], st[i], pa[i], di[i], ks[i])
        vox *= input.size(2 + i) + lo + hi
    cout_p = -(-weight.size(1) // bn) * bn
    return (vox * cp * elem < 2 ** 31 - 1 and math.prod(ks) * cout_p * cp * elem < 2 ** 31 - 1
            and cout_p // bn <= _MAX_GRID_Y)


def _phase_halo(n_in: int, n_out: int, s: int, pad: int, dil: int, k: int) -> Tuple[int, int]:
    """Zero halo (front, back) the stride phases read around one input dimension: the mirror
    of ``igemm_halo`` in csrc/ct3d_igemm.cuh."""
    lo_idx, hi_idx = 0, n_in - 1
    g = math.gcd(s, dil)
    kstep, doff = s // g, dil // g
    for rho in range(s):
        t_count = -(-(n_out - rho) // s) if rho < n_out else 0
        want = (rho + pad) % s
        k0 = next((kk for kk in range(min(k, kstep)) if (kk * dil) % s == want), -1)
        if t_count == 0 or k0 < 0:
            continue
        n_taps = (k - 1 - k0) // kstep + 1
        off0 = (rho + pad - k0 * dil) // s
        lo_idx = min(lo_idx, off0 - (n_taps - 1) * doff)
        hi_idx = max(hi_idx, t_count - 1 + off0)
    return -lo_idx, hi_idx - (n_in - 1)


#: Shared memory a CTA may opt into on compute capability 9.0 (bytes), and what the bulk-copy
#: wgmma kernels hold statically (per-channel slots and barriers, at most; ptxas reports 8.3 KB).
_SMEM_OPTIN_SM90 = 232448
_BULK_STATIC_SMEM = 8448


def _bulk_fits(config: int, patch_rows: int, n_regs: int) -> bool:
    """Whether bulk-copy wgmma configuration ``config`` fits in shared memory with a patch of
    ``patch_rows`` rows and ``n_regs`` epilogue tile registers: the mirror of csrc/ct3d_wgmma.cuh
    WgBox::smem_bytes (patch and B ring, or the tile registers that alias them, then the rows'
    bookkeeping), so that the rule picks it only where it runs."""
    kbytes, bm, bn, _ = IGEMM_CONFIGS[config]
    stages = {27: 8, 28: 4}[config]
    main = patch_rows * kbytes + stages * bn * kbytes
    regs = n_regs * bn * (bm + 4) * 4
    total = max(main, regs) + bm * 24 + patch_rows * 4 + _BULK_STATIC_SMEM
    return total <= _SMEM_OPTIN_SM90


def _igemm_config(cin: int, cout: int, elem: int, macs: float, stride1: bool, taps: int,
                  wgmma: bool = False, patch_rows: int = 0, n_regs: int = 1) -> int:
    """The channels-last implicit GEMM's tile configuration (an ``IGEMM_CONFIGS`` id) by shape,
    from the H200 sweeps in docs/kernel.md (v9 row tiles, v10 box tiles).

    Stride 1 in every dimension (every tap in one phase, 27 to 125 taps): box tiles, whose input
    patch is read once per K chunk for all taps: BN 16 up to 16 output channels, BN 32 up to 32,
    else BN 64 with 128-byte K steps when C_in fills them and the kernel has at most 27 taps
    (l2_61), else 64-byte steps (larger patches keep 2-3 CTAs per multiprocessor: l2_77, l1_68).
    Strided: row tiles, 128 x 32 with 64-byte K steps up to 32 output channels; above, 128-byte
    K steps when C_in fills them (3 stages where a phase's K is long, ``macs`` >= 400
    multiply-adds per output, as a 2 x 4 x 16 box: l2_78; else 2 stages and 3 CTAs per
    multiprocessor), else 64-byte steps (3; in half precision 9, the same tile with its
    registers capped for 3 CTAs per multiprocessor: bf16 l2_20 0.667 -> 0.558 ms, l2_26 2.69 ->
    1.94, l2_38 0.886 -> 0.744 in the v25 sweep). (Until v26 an epilogue that streamed a
    full-size tensor took 18, 64 x 64 tiles at 4 CTAs per multiprocessor; TF32 l2_26, its
    only suite row, ran 3% faster on 10 in two v25/v26 runs: 1.585 / 1.593 against 1.641 /
    1.645 ms.) Stride 1 up to 32 output channels: BN 16 box tiles (15) up to 16, else BN 32
    with 128-byte K steps (17) where they pad C_in no more than 64-byte steps and the kernel
    has at most 27 taps (bf16 l1_70: 4.35 against 4.77 ms on 12 in two runs), else 12.

    On Hopper (``wgmma``: compute capability 9.0) stride-1 shapes with more than 32 output
    channels take the wgmma box tiles of two warpgroups (a 4 x 8 x 8 box): BN 128 above 64
    output channels when C_in has at least 128 bytes (l2_61, l2_77), else BN 64 with 128-byte
    K chunks when C_in fills them in float32 (l1_68), 64-byte chunks otherwise (l1_61; every
    such half-precision shape: l1_68, l2_13 in bf16); float32 with C_in under 128 bytes (l2_13)
    keeps the mma.sync box (H200 sweeps, docs/kernel.md v11).

    The bulk-copy wgmma boxes (v24) replace two of those where they fit in shared memory
    (``patch_rows``: the 4 x 8 x 8 box's input patch rows; ``n_regs``: epilogue tile registers):
    BN 128 with 128-byte chunks (28) above 64 output channels when C_in fills 128-byte chunks
    (l2_61, l2_77: 1.35-1.47x in TF32 and bf16), BN 64 with 64-byte chunks at 2 CTAs per
    multiprocessor (27) up to 64 output channels when C_in has at most 64 bytes (l2_13: 1.19x;
    l1_68 in bf16)."""
    fills_128 = (cin * elem) % 128 == 0
    # 128-byte K steps cost no more padding of C_in than 64-byte ones (C_in * elem a multiple
    # of 128 bytes, or 64 < its remainder < 128: bf16 C_in = 48 pads to 64 either way)
    k128_free = (cin * elem) % 128 == 0 or (cin * elem) % 128 > 64
    if stride1 and wgmma and cout > 32:
        if cout > 64 and cin * elem >= 128:
            if fills_128 and _bulk_fits(28, patch_rows, n_regs):
                return 28
            return 24
        if cout <= 64 and cin * elem <= 64 and _bulk_fits(27, patch_rows, n_regs):
            return 27
        if cout <= 64 and (elem == 2 or cin * elem >= 128):
            return 23 if elem == 4 and fills_128 else 22
    if stride1:
        if cout <= 16:
            return 15
        if cout <= 32:
            return 17 if k128_free and taps <= 27 else 12
        return 11 if fills_128 and taps <= 27 else 13
    if cout <= 32:
        return 4
    if fills_128:
        return 14 if macs >= 400 else 10
    return 9 if elem == 2 else 3


def _igemm_rule(input, weight, conv_shape, st, pa, di, groups, n_regs=1):
    """(applies, picked by "auto", tiles) for the channels-last implicit GEMM; ``n_regs``: the
    epilogue program's tile registers."""
    if groups != 1 or max(st) > _IGEMM_MAX_STRIDE:
        return False, False, None
    cin, cout = weight.size(0), weight.size(1)
    ks = weight.shape[2:]
    elem = input.element_size()
    macs = cin * math.prod(ks) / (st[0] * st[1] * st[2])
    stride1 = all(v == 1 for v in st)
    # the wgmma box's (4 x 8 x 8) input patch at stride 1
    patch_rows = math.prod(b + d * (k - 1) for b, d, k in zip((4, 8, 8), di, ks))
    config = (_igemm_config(cin, cout, elem, macs, stride1, math.prod(ks),
                            _has_wgmma(input.device), patch_rows, n_regs)
              if IGEMM_CONFIG is None else IGEMM_CONFIG)
    if config in IGEMM_WLINE_CONFIGS:  # forced (timing scripts): where the W lines fit
        if _wline_reason(input, conv_shape, st, groups) is not None:
            return False, False, None
        tiles = _wline_tiles(input, weight, conv_shape, st, pa, di)
        return tiles is not None, False, tiles
    if IGEMM_CONFIG is None and config in IGEMM_WGMMA_CONFIGS:
        # few tiles (split-K): the wgmma boxes would fall back to row tiles of their BN (128
        # for 24, 8 warps), slower than the mma.sync choice's own fallback (GAN generator's
        # first layer at batch 1); the wgmma kernel has no split-K
        _, bm_w, bn_w, _ = IGEMM_CONFIGS[config]
        ck_w = IGEMM_CONFIGS[config][0] // elem
        if _igemm_splits(input, conv_shape, st, ks, -(-cin // ck_w), bm_w,
                         -(-cout // bn_w)) > 1:
            config = _igemm_config(cin, cout, elem, macs, stride1, math.prod(ks))
    kbytes, _, bn, _ = IGEMM_CONFIGS[config]
    ck = kbytes // elem
    cp = -(-cin // ck) * ck
    cout_p = -(-cout // bn) * bn
    if not _igemm_fits(input, weight, conv_shape, st, pa, di, ck, bn):
        return False, False, None
    # "auto" leaves to launch_conv: the direct kernel's shapes (csrc/ct3d_conv.cuh direct_pays:
    # few multiply-adds per output) and strided shapes with C_out < 32, where the strided-input
    # GEMM's 256 x 16 and 128 x 32 tiles measured faster; stride-1 shapes with C_out < 32 take
    # the box tiles (l1_58 1.95 -> 1.03 ms, l1_70 11.1 -> 7.1 ms).
    direct = macs <= 32 or (input.dtype == torch.float32 and cin <= 8 and macs <= 128)
    bm = IGEMM_CONFIGS[config][1]
    splits = _igemm_splits(input, conv_shape, st, ks, cp // ck, bm, cout_p // bn)
    if splits > 1 and config in _BOX_FALLBACK:
        config = _BOX_FALLBACK[config]  # split-K runs on the row tiles (same K step and BN)
        bm = IGEMM_CONFIGS[config][1]
    return True, not direct and (cout >= 32 or stride1), (ck, bn, config, bm, splits)


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


_SM_COUNT: Dict[int, int] = {}


def _has_wgmma(device: torch.device) -> bool:
    """Whether the wgmma configurations run on ``device`` (compute capability 9.0: the extension
    is built for sm_90a there); cached."""
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _WGMMA:
        _WGMMA[idx] = torch.cuda.get_device_capability(idx) == (9, 0)
    return _WGMMA[idx]


_WGMMA: Dict[int, bool] = {}


def _igemm_splits(input, conv_shape, st, ks, chunks: int, bm: int, n_tiles: int) -> int:
    """Split-K factor of the channels-last GEMM: where its tiles (output voxels of a phase x
    channel tiles) are fewer than the multiprocessors and each tile has a long K (small inputs
    through many channels: the first layers of a GAN generator at batch 1), the K steps of
    a tile are divided among up to 32 CTAs, keeping at least 4 steps each, to fill about two
    CTAs per multiprocessor. ``IGEMM_SPLITS`` overrides it (tests)."""
    if IGEMM_SPLITS is not None:
        return IGEMM_SPLITS
    if input.device.type != "cuda":
        return 1
    n_phase = st[0] * st[1] * st[2]
    m_max = input.size(0)
    for i in range(3):
        m_max *= -(-conv_shape[2 + i] // st[i])
    tiles = -(-m_max // bm) * n_phase * n_tiles
    steps = chunks * math.prod(ks) // n_phase  # K steps of an average phase
    sms = _sm_count(input.device)
    if tiles >= sms or steps < 8:
        return 1
    return max(1, min(32, -(-2 * sms // tiles), steps // 4))


class _NotCovered(Exception):
    """A program the kernel cannot run; the message says why."""


class _Row:
    """One decoded instruction before register allocation: sources are value numbers."""

    __slots__ = ("op", "srcs", "b_flag", "c", "f0", "f1", "dst", "imm", "patches", "a", "b", "d")

    def __init__(self, op, srcs, dst, *, b_flag=0, c=0, f0=0.0, f1=0.0):
        self.op, self.srcs, self.dst = int(op), list(srcs), dst
        self.b_flag, self.c, self.f0, self.f1 = b_flag, c, f0, f1
        self.imm = [False] * len(self.srcs)  # binary ops: operand is an immediate (f0 / f1)
        self.patches: List[Tuple[int, int]] = []  # (field 0=f0 / 1=f1, extra index) per call
        self.a = self.b = self.d = 0

    def ints(self) -> List[int]:
        return [self.op, self.a, self.b, self.c, self.d]


def _passes_through(op: Opcode, a: int, b: int, consts: Dict[int, tuple]) -> Optional[int]:
    """The operand (a value number) that binary op ``op`` returns bit for bit, or None.

    With ``c`` a Python float known when the plan is made (``consts`` kind "f"): ``x * 1``,
    ``1 * x``, ``x / 1`` (the kernel's ``x * (1 / 1)``), ``x - 0`` (``-0 - 0`` is ``-0``) and
    ``x + (-0)``, ``(-0) + x``. Not ``x + 0``, which turns ``-0`` into ``+0``. A NaN stays a
    NaN either way."""
    def const(v):
        k = consts.get(v)
        return k[1] if k is not None and k[0] == "f" else None

    ca, cb = const(a), const(b)
    if (ca is None) == (cb is None):
        return None
    x, c, c_first = (b, ca, True) if ca is not None else (a, cb, False)
    neg_zero = c == 0.0 and math.copysign(1.0, c) < 0
    if op == Opcode.MUL and c == 1.0:
        return x
    if op == Opcode.DIV and not c_first and c == 1.0:
        return x
    if op == Opcode.SUB and not c_first and c == 0.0 and not neg_zero:
        return x
    if op == Opcode.ADD and neg_zero:
        return x
    return None


def _decode_program(input, program, scalars, extras, conv_shape, channels):
    """Program -> rows over value numbers, with scalar operands of binary ops folded in.

    Returns (rows, slot_extras, slot_strides); raises _NotCovered.
    """
    slot_extras: List[int] = []
    slot_strides: List[List[int]] = []

    def slot(idx: int, strides: List[int]) -> int:
        slot_extras.append(idx)
        slot_strides.append(strides)
        return len(slot_extras) - 1

    consts: Dict[int, tuple] = {}  # value -> ("f", float) or ("x", CPU 0-d extras index)
    rows: List[_Row] = []
    materialized: Dict[int, int] = {}  # constant value -> value holding it in a register
    next_value = [len(program) // INSTR_WIDTH + 1]  # fresh numbers for materialized constants

    def reg_value(v: int) -> int:
        """A value number whose content is in a register (materializes constants)."""
        if v not in consts:
            return v
        if v not in materialized:
            kind, x = consts[v]
            nv = next_value[0]
            next_value[0] += 1
            row = _Row(Opcode.LOAD_SCALAR, [], nv, f0=x if kind == "f" else 0.0)
            if kind == "x":
                row.patches.append((0, x))
            rows.append(row)
            materialized[v] = nv
        return materialized[v]

    # DETACH and the identities of _passes_through: the value is its operand's
    alias: Dict[int, int] = {}
    for k in range(len(program) // INSTR_WIDTH):
        op, a, b, c, d, _ = program[k * INSTR_WIDTH:(k + 1) * INSTR_WIDTH]
        op = Opcode(op)
        v = k + 1
        a = alias.get(a, a)
        if op in _BINARY:
            b = alias.get(b, b)
        if op == Opcode.DETACH:
            alias[v] = a
            continue
        if op == Opcode.LOAD_SCALAR:
            consts[v] = ("f", float(scalars[a]))
        elif op == Opcode.LOAD_TENSOR:
            t = extras[a]
            if t.device != input.device:  # a 0-d CPU tensor: its value is read at each call
                consts[v] = ("x", a)
            else:
                try:
                    strides = _expanded_strides(t, conv_shape)
                except RuntimeError:
                    raise _NotCovered(f"extras[{a}] of shape {tuple(t.shape)} does not broadcast "
                                      f"to the output shape {conv_shape}") from None
                rows.append(_Row(op, [], v, c=slot(a, strides)))
        elif op in _BINARY:
            kept = _passes_through(op, a, b, consts)
            if kept is not None:  # x * 1, x / 1, x - 0, x + (-0): no instruction
                alias[v] = kept
                continue
            row = _Row(op, [a, b], v)
            for j, src in enumerate((a, b)):
                if src in consts:
                    kind, x = consts[src]
                    row.imm[j] = True
                    if kind == "f":
                        if j == 0:
                            row.f0 = x
                        else:
                            row.f1 = x
                    else:
                        row.patches.append((j, x))
            rows.append(row)
        elif op in _UNARY:
            rows.append(_Row(op, [reg_value(a)], v))
        elif op in _ONE_SCALAR:
            rows.append(_Row(op, [reg_value(a)], v, f0=float(scalars[b])))
        elif op in _TWO_SCALARS:
            rows.append(_Row(op, [reg_value(a)], v, f0=float(scalars[b]), f1=float(scalars[c])))
        elif op in (Opcode.GELU, Opcode.SOFTMAX):
            rows.append(_Row(op, [reg_value(a)], v, b_flag=int(b)))
        elif op == Opcode.CLAMP:
            rows.append(_Row(op, [reg_value(a)], v,
                             f0=float(scalars[b]) if b >= 0 else -math.inf,
                             f1=float(scalars[c]) if c >= 0 else math.inf))
        elif op == Opcode.PRELU:
            w = extras[b]
            s = _channel_strides(w, channels, allow_one=True)
            if w.device != input.device or s is None:
                raise _NotCovered(f"the PReLU weight extras[{b}] must be a tensor on the input's "
                                  f"device with 1 or {channels} elements, got shape "
                                  f"{tuple(w.shape)} on {w.device}")
            rows.append(_Row(op, [reg_value(a)], v, c=slot(b, s)))
        elif op == Opcode.BATCH_NORM:
            first = len(slot_extras)
            for j in range(4 if c == 1 else 2):
                t = extras[b + j]
                s = _channel_strides(t, channels, allow_one=False)
                if t.device != input.device or s is None:
                    raise _NotCovered(f"BatchNorm tensor extras[{b + j}] must be a 1-D tensor on "
                                      f"the input's device of {channels} elements, got shape "
                                      f"{tuple(t.shape)} on {t.device}")
                slot(b + j, s)
            rows.append(_Row(op, [reg_value(a)], v, b_flag=int(c), c=first,
                             f0=float(scalars[d])))
        elif op == Opcode.LAYER_NORM:
            size = program[k * INSTR_WIDTH + 5]
            if size != conv_shape[4]:  # the reference raises PyTorch's error for this call
                raise _NotCovered(f"LayerNorm over {size} elements, but the output's last "
                                  f"dimension has {conv_shape[4]}")
            affine = []
            for what, idx in (("weight", b), ("bias", c)):
                if idx < 0:
                    affine.append(-1)
                    continue
                t = extras[idx]
                if t.device != input.device or t.dim() != 1 or t.numel() != size:
                    raise _NotCovered(f"the LayerNorm {what} extras[{idx}] must be a 1-D tensor "
                                      f"of {size} elements on the input's device, got shape "
                                      f"{tuple(t.shape)} on {t.device}")
                affine.append(slot(idx, [0, 0, 0, 0, t.stride(0)]))
            # kernel fields: c = weight slot, b = bias slot (-1: absent), f0 = eps
            rows.append(_Row(op, [reg_value(a)], v, b_flag=affine[1], c=affine[0],
                             f0=float(scalars[d])))
        else:  # check_program accepted it, so the table above is incomplete
            raise _NotCovered(f"opcode {op.name} is not implemented by the kernel")
    return rows, slot_extras, slot_strides, alias


def _allocate_registers(rows: List[_Row], result: int):
    """Assign tile registers to values (value 0 starts in register 0); drop dead rows.

    Returns (rows, registers used, register of ``result``); raises _NotCovered when the
    program keeps more than MAX_REGS values alive at once.
    """
    # Rows whose value is never read and is not the result do nothing: drop them (repeat, as
    # dropping one can make its sources dead).
    while True:
        used = {v for r in rows for v, imm in zip(r.srcs, r.imm) if not imm} | {result}
        kept = [r for r in rows if r.dst in used]
        if len(kept) == len(rows):
            break
        rows = kept
    last_use: Dict[int, int] = {}
    for i, r in enumerate(rows):
        for v, imm in zip(r.srcs, r.imm):
            if not imm:
                last_use[v] = i
    reg = {0: 0}
    free = list(range(1, MAX_REGS))
    if 0 not in last_use and result != 0:
        free.insert(0, 0)
    top = 0
    for i, r in enumerate(rows):
        src_regs = [-1 if imm else reg[v] for v, imm in zip(r.srcs, r.imm)]
        for v in set(v for v, imm in zip(r.srcs, r.imm) if not imm):
            if last_use[v] == i and v != result:
                free.append(reg[v])
        if not free:
            raise _NotCovered(f"the epilogue keeps more than {MAX_REGS} values alive at once")
        free.sort()
        r.d = free.pop(0)
        reg[r.dst] = r.d
        top = max(top, r.d)
        if r.op in (Opcode.ADD, Opcode.SUB, Opcode.MUL, Opcode.DIV):
            r.a, r.b = src_regs
        else:
            r.a = src_regs[0] if src_regs else 0
            r.b = r.b_flag
    return rows, top + 1, reg[result]


def _get_plan(*args) -> _Plan:
    return _plan_for(_key(*args), args)


def _plan_for(key: tuple, args: tuple) -> _Plan:
    plan = _plans.get(key)
    if plan is None:
        plan = _make_plan(*args)
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
        _plans[key] = plan
    return plan


def fallback_reason(input, weight, bias, stride, padding, output_padding, dilation, groups,
                    program, scalars, extras) -> Optional[str]:
    """Why a call with these arguments would run the reference on CUDA; None when fused.

    Same arguments as ``ct3d::conv_transpose3d_epilogue``. Builds the extension if needed.
    """
    if input.device.type != "cuda":
        return f"input is on {input.device}, not CUDA"
    if _build.load() is None:
        return f"CUDA extension unavailable: {_build.why_not()}"
    plan = _get_plan(input, weight, bias, stride, padding, output_padding, dilation, groups,
                     program, scalars, extras)
    why = plan.fallback
    if (why is None and plan.wline and input.dtype == torch.float32
            and not torch.backends.cudnn.allow_tf32):
        why = ("a LayerNorm over W runs on the tensor-core kernel only, not in exact FP32 "
               "(torch.backends.cudnn.allow_tf32 = False)")
    if why is not None and plan.ln_split is not None:
        before = fallback_reason(input, weight, bias, stride, padding, output_padding, dilation,
                                 groups, plan.ln_split[0], scalars, extras)
        return (f"{why}: the LayerNorm and the ops after it run in PyTorch, the conv and the "
                f"ops before it " + ("in the fused kernel" if before is None
                                     else f"in the reference ({before})"))
    return why


# Per-shape choice between the fused kernel and cuDNN + PyTorch epilogue ("reference"): where
# the fused kernel is still slower (some math-bound shapes, see docs/performance.md) the first
# call of a signature times the candidates (interleaved rounds of bursts of calls, lowest
# median: _pick_fastest) and keeps the fastest. Off with CT3D_FX_AUTOTUNE=0 or
# ``_cuda.AUTOTUNE = False``; never during stream capture (CUDA graphs) or NaN poisoning.
AUTOTUNE = os.environ.get("CT3D_FX_AUTOTUNE", "1") != "0"
# A third candidate for the autotune: cuDNN on channels_last_3d copies of an NCDHW input and of
# the weight, with cudnn.benchmark on for the call (_reference_channels_last). On by default since
# the v16 measurement (H200, docs/performance.md): TF32 models l2_61 2.86 -> 2.42 ms, l2_77 4.68
# -> 4.43, the GAN generator 1.13-1.45x faster, every other suite row within the run-to-run
# spread, bf16 unchanged. Off with CT3D_FX_CUDNN_CHANNELS_LAST=0 or
# ``_cuda.CUDNN_CHANNELS_LAST = False``.
CUDNN_CHANNELS_LAST = os.environ.get("CT3D_FX_CUDNN_CHANNELS_LAST", "1") != "0"
# The epilogue pass (csrc/kernels_epilogue_pass.cu): the bias and the whole program in one pass
# over a conv output cuDNN computed. With it, the autotune times "cudnn_channels_last_pass": the
# channels-last candidate with the pass reading cuDNN's channels_last_3d output and writing the
# reference's layout. Off with CT3D_FX_EPILOGUE_PASS=0 or ``_cuda.EPILOGUE_PASS = False``.
# "cudnn_pass" (the reference's conv on the input as given, then the pass in place) is timed only
# with CUDNN_PASS on (CT3D_FX_CUDNN_PASS=1): in the v20 run (docs/performance.md) it won the
# single-call timing on GAN layers and the generator got slower as a whole (bf16 batch 2: 1.09x
# -> 0.93x eager); in v21 (16-byte pass, burst timing) it lost to the channels-last form with
# the pass or to "reference" on every site measured (docs/kernel.md, Next).
EPILOGUE_PASS = os.environ.get("CT3D_FX_EPILOGUE_PASS", "1") != "0"
# The pass's vector kernels (csrc/ct3d_pass_lite.cuh: 8 elements per thread step, 16-byte
# loads, the program in registers), where the tensors and the program allow them (the
# channels_last_3d -> NCDHW form stores float32 outputs one element per lane, half outputs in
# 16-byte vectors where it can: the faster of the two on the H200). Off with
# CT3D_FX_PASS_LITE=0 or ``_cuda.PASS_LITE = 0`` (the staged / plain kernels then run); 2 / 3
# (measurements, scripts/pass_time.py) put every channels_last_3d -> NCDHW pass on them with
# scalar / 16-byte output stores.
PASS_LITE = {"0": 0, "2": 2, "3": 3}.get(os.environ.get("CT3D_FX_PASS_LITE", "1"), 1)
# The kernel the last epilogue pass ran: "plain", "staged", "lite" (same layout),
# "lite_transpose" (channels_last_3d -> NCDHW), or None for an empty output.
LAST_PASS_KERNEL: Optional[str] = None
_PASS_KERNELS = {0: None, 1: "plain", 2: "staged", 3: "lite", 4: "lite_transpose"}
CUDNN_PASS = os.environ.get("CT3D_FX_CUDNN_PASS", "0") == "1"
# "subpixel": the transposed conv as one stride-1 conv3d over its output phases (cuDNN,
# ct3d_fx/subpixel.py) + the program in PyTorch ops, timed where a stride is above 1 and either
# groups == 1 with C_out at most _SUBPIXEL_MAX_COUT or groups > 1 with the per-group C_out
# (weight.size(1)) at most _SUBPIXEL_MAX_COUT_GROUPED: there cuDNN's transposed-conv kernels
# and the fused kernel's channel tiles are mostly idle (the GAN generator's 1-channel last
# layer). The grouped limit is for suite problem l1_72 (C_in 32, C_out 32, groups 4, kernel
# (3, 5, 7), stride 2, padding (1, 2, 3), output_padding 1, input (8, 32, 12, 24, 48)): it runs
# at 38x its roofline floor both in cuDNN's transposed-conv kernel and in ours, with 8 output
# channels per group; the conv3d form (one F.conv3d with groups=4) gives cuDNN 8x as many, 64
# per group, for E_D * E_H * E_W * 8 / (3 * 5 * 7) = 2 * 3 * 4 * 8 / 105 = 1.8x the
# multiply-adds. Measured in v28 (H200): the autotune kept it for bf16 l1_72 (0.508 ms against
# the fused kernel's 0.608), not in TF32 or exact FP32; it is timed against the other
# candidates and kept only where it is faster. Off with CT3D_FX_SUBPIXEL=0 or
# ``_cuda.SUBPIXEL = False``.
SUBPIXEL = os.environ.get("CT3D_FX_SUBPIXEL", "1") != "0"
_SUBPIXEL_MAX_COUT = 4
_SUBPIXEL_MAX_COUT_GROUPED = 16
_choices: Dict[tuple, str] = {}
# Each decision's candidate medians (ms per call), by the key of _choices
_timings: Dict[tuple, Dict[str, float]] = {}
# Bumped on every autotune decision (run()), with the choice: a caller that reads the counter
# before and after its own call learns whether that call decided, and what (FusedSite records
# it for the rewrite report) without computing the call's key.
_decisions = 0
_last_decision: Optional[str] = None


def autotune_choices() -> Dict[tuple, str]:
    """The implementation chosen per call signature so far: "fused", "reference",
    "cudnn_channels_last", "cudnn_channels_last_pass", "cudnn_pass" or "subpixel"."""
    return dict(_choices)


def autotune_timings() -> Dict[tuple, Dict[str, float]]:
    """Per call signature (the keys of ``autotune_choices``), each candidate's median ms per
    call as the autotune timed it."""
    return {k: dict(v) for k, v in _timings.items()}


def _channels_last_applies(input: torch.Tensor) -> bool:
    """Whether the channels-last candidate differs from the reference: an NCDHW input."""
    return (CUDNN_CHANNELS_LAST and input.dim() == 5 and input.is_cuda
            and not input.is_contiguous(memory_format=torch.channels_last_3d))


@contextlib.contextmanager
def _cudnn_benchmark():
    """``torch.backends.cudnn.benchmark`` on inside the block (cuDNN picks its algorithm by
    timing it), restored after; only this flag (``cudnn.flags()`` would reset the others)."""
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _reference_channels_last(args: tuple, shape, stride, dtype, plan=None) -> torch.Tensor:
    """The reference computed on channels_last_3d copies: ``F.conv_transpose3d`` of the input
    and weight in channels_last_3d (cuDNN picks its algorithm by timing it: ``cudnn.benchmark``
    is on for this call only, the other cuDNN flags stay as they are), the program in PyTorch
    ops, and the result written into a tensor of ``shape``, ``stride``, ``dtype``: the output
    the fused kernel allocates (the reference's layout).

    With ``plan`` (the call's decoded program) where the epilogue pass applies
    (``_pass_applies``), the bias and the whole program run there instead: one pass that reads
    cuDNN's channels_last_3d output and writes the output.

    Where the bias and the whole program are one per-channel affine map of the conv output
    (``_affine_prefix``: scale/shift by scalars or per-channel tensors, eval BatchNorm), they
    run as one ``addcmul`` that writes the output: one pass instead of one per op plus the
    copy; where only a prefix of the program is, the bias and that prefix run as one
    ``addcmul``, the rest as before.

    Same values as the reference up to the conv's summation order (TF32 or not as
    ``torch.backends.cudnn.allow_tf32`` says) and, for a folded program, the rounding of the
    folded scale and shift (computed in float32, float64 for float64 inputs)."""
    input, weight, bias, st, pa, op, di, g, program, scalars, extras = args
    cl = torch.channels_last_3d
    def conv(b):  # cuDNN on channels_last_3d copies, cudnn.benchmark on for this call only
        with _cudnn_benchmark():
            return F.conv_transpose3d(input.contiguous(memory_format=cl),
                                      _weight_channels_last(weight), b, list(st), list(pa),
                                      list(op), g, list(di))

    return _conv_then_program(args, shape, stride, dtype, conv, plan)


def _conv_then_program(args: tuple, shape, stride, dtype, conv, plan=None) -> torch.Tensor:
    """The call's bias and program after ``conv(b)`` (the conv output of ``args``, with the
    bias ``b`` added where not None), written into a tensor of ``shape``, ``stride``,
    ``dtype``: in the epilogue pass with ``plan`` where it applies, else as one ``addcmul``
    where the bias and program are a per-channel affine map (``_affine_prefix``), else op by op
    (``ops._run_program``) with the affine prefix folded."""
    input, weight, bias, st, pa, op, di, g, program, scalars, extras = args
    ext = _build.load() if plan is not None and _pass_applies(plan, input) else None
    if ext is not None:
        out = torch.empty_strided(shape, stride, dtype=dtype, device=input.device)
        return _run_pass(ext, plan, conv(None), bias, extras, out)
    fold = _affine_prefix(program, scalars, extras, bias, weight.size(1) * g,
                          torch.promote_types(torch.promote_types(input.dtype, dtype),
                                              torch.float32), input.device, input.dtype)
    y = conv(None if fold is not None else bias)
    if fold is not None:
        k, scale, shift = fold[0], fold[1].view(1, -1, 1, 1, 1), fold[2].view(1, -1, 1, 1, 1)
        if k * INSTR_WIDTH == len(program):
            # bias and program in one pass that also writes the output's layout
            out = torch.empty_strided(shape, stride, dtype=dtype, device=input.device)
            return torch.addcmul(shift, y, scale, out=out)
        # bias and the program's first k instructions in one pass, the rest op by op
        y = torch.addcmul(shift, y, scale, out=torch.empty_like(y))
        program = _shift_values(program, k)
    r = ops._run_program(y, program, scalars, extras)
    if r.stride() == tuple(stride) and r.dtype == dtype and tuple(r.shape) == tuple(shape):
        return r
    out = torch.empty_strided(shape, stride, dtype=dtype, device=input.device)
    out.copy_(r)
    return out


def _subpixel_applies(input: torch.Tensor, weight: torch.Tensor, groups: int,
                      stride: Sequence[int]) -> bool:
    """Whether the autotune times the "subpixel" candidate for this call (SUBPIXEL): a 5-D
    input, a stride above 1, and C_out at most _SUBPIXEL_MAX_COUT for groups == 1 or the
    per-group C_out (``weight.size(1)``) at most _SUBPIXEL_MAX_COUT_GROUPED for groups > 1."""
    if groups == 1:
        limit = _SUBPIXEL_MAX_COUT
    elif groups > 1:
        limit = _SUBPIXEL_MAX_COUT_GROUPED
    else:
        return False
    return (SUBPIXEL and weight.size(1) <= limit and max(stride) > 1 and input.dim() == 5)


def _reference_subpixel(args: tuple, shape, stride, dtype) -> torch.Tensor:
    """The "subpixel" candidate: the transposed conv as one conv3d over its output phases
    (``subpixel.conv_transpose3d_subpixel`` with the call's groups, ``args[7]``: one grouped
    conv3d; cuDNN picks its algorithm by timing it, ``cudnn.benchmark`` on for this call only;
    the conv3d weight cached per weight version, stride, padding, dilation and groups), then
    the bias and program as ``_conv_then_program`` runs them. Same values as the reference up
    to the conv's summation order (TF32 or not as ``torch.backends.cudnn.allow_tf32`` says)."""
    input, weight, bias, st, pa, op, di, g, program, scalars, extras = args
    dims = subpixel.subpixel_dims(input.shape[2:], weight.shape[2:], st, pa, op, di)
    if weight.is_cuda:
        w2 = _cached_copy(weight, ("subpixel", tuple(st), tuple(pa), tuple(di), g),
                          lambda w: subpixel.subpixel_weight(w.detach(), dims, groups=g))
    else:
        w2 = subpixel.subpixel_weight(weight, dims, groups=g)

    def conv(b):
        with _cudnn_benchmark():
            return subpixel.conv_transpose3d_subpixel(input, weight, b, st, pa, op, di, w2,
                                                      dims, groups=g)

    return _conv_then_program(args, shape, stride, dtype, conv)


def _per_channel(t: torch.Tensor, channels: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` as a (channels,) or (1,) vector of ``dtype`` when, broadcast against a 5-D
    (N, channels, D, H, W) value, it varies along the channels only; else None."""
    if t.numel() == 1:
        return t.reshape(1).to(dtype)
    if t.dim() > 5:
        return None
    shape = (1,) * (5 - t.dim()) + tuple(t.shape)
    if shape[1] != channels or any(n != 1 for i, n in enumerate(shape) if i != 1):
        return None
    return t.reshape(channels).to(dtype)


def _affine_prefix(program, scalars, extras, bias, channels: int, dtype: torch.dtype,
                   device: torch.device, conv_dtype: Optional[torch.dtype]):
    """``(k, scale, shift)`` for the longest prefix of k instructions of ``program`` whose last
    value is ``conv * scale + shift`` per output channel (``conv`` without the bias, which is in
    ``shift``; scale and shift (channels,) or (1,) tensors of ``dtype``) and after which no
    instruction reads a value before value k; None when there is none (k >= 1).

    Folds ADD / SUB / MUL / DIV with scalars or per-channel tensors (DIV by them only), sums
    and differences of two such maps, NEG, DETACH and eval-mode BATCH_NORM; the walk stops at
    any other op, or an extra tensor that varies over more than the channels. A prefix shorter
    than the program needs every tensor it reads (bias included) to be of ``conv_dtype`` (then
    its value has the conv output's dtype, as the rest of the program expects); None there
    allows only the whole program."""
    rows = ops._split(program)
    n = len(rows)
    # lowest value number read by instructions i.. (n: none)
    low = [n + 1] * (n + 1)
    for i in range(n - 1, -1, -1):
        kinds = ops._FIELDS[Opcode(rows[i][0])]
        reads = [rows[i][1 + j] for j, kind in enumerate(kinds) if kind == "v"]
        low[i] = min([low[i + 1]] + reads)
    uniform = conv_dtype is not None and (bias is None or bias.dtype == conv_dtype)
    # a value: ("affine", scale, shift) of the conv output, or ("const", c); scale, shift and
    # c are Python floats or (channels,) / (1,) tensors
    shift0: Any = 0.0 if bias is None else bias.reshape(-1).to(dtype)  # (C_out,)
    vals: List[Any] = [("affine", 1.0, shift0)]
    best = (0, 1.0, shift0) if n == 0 and bias is not None else None  # the bias alone
    for i, row in enumerate(rows):
        try:
            v = _fold_one(row, vals, scalars, extras, channels, dtype)
        except ZeroDivisionError:  # a Python float divided by 0.0: left to the ops (inf / nan)
            v = None
        if v is None:
            break
        vals.append(v)
        code = row[0]
        if code == Opcode.LOAD_TENSOR:
            uniform = uniform and extras[row[1]].dtype == conv_dtype
        elif code == Opcode.BATCH_NORM:
            uniform = uniform and all(extras[row[2] + j].dtype == conv_dtype
                                      for j in range(4 if row[3] else 2))
        if v[0] == "affine" and low[i + 1] >= i + 1 and (i + 1 == n or uniform):
            best = (i + 1, v[1], v[2])
    if best is None:
        return None
    k, scale, shift = best
    return (k,) + tuple(t.to(device) if isinstance(t, torch.Tensor)
                        else torch.full((1,), t, dtype=dtype, device=device)
                        for t in (scale, shift))


def _fold_one(row, vals, scalars, extras, channels, dtype):
    """The value instruction ``row`` defines, as ``_affine_prefix`` tracks them, or None."""
    code, a, b, c, d, _ = row
    if code == Opcode.LOAD_SCALAR:
        return ("const", float(scalars[a]))
    if code == Opcode.LOAD_TENSOR:
        v = _per_channel(extras[a], channels, dtype)
        return None if v is None else ("const", v)
    x = vals[a]
    if code in (Opcode.ADD, Opcode.SUB, Opcode.MUL, Opcode.DIV):
        y = vals[b]
        if x[0] == "const" and y[0] == "const":
            k = {Opcode.ADD: operator.add, Opcode.SUB: operator.sub,
                 Opcode.MUL: operator.mul, Opcode.DIV: operator.truediv}[code]
            return ("const", k(x[1], y[1]))
        if code in (Opcode.ADD, Opcode.SUB) and x[0] == y[0] == "affine":
            k = operator.add if code == Opcode.ADD else operator.sub
            return ("affine", k(x[1], y[1]), k(x[2], y[2]))
        if code == Opcode.ADD:
            (_, s, t), (_, k) = (x, y) if x[0] == "affine" else (y, x)
            return ("affine", s, t + k)
        if code == Opcode.SUB:
            return (("affine", x[1], x[2] - y[1]) if x[0] == "affine"
                    else ("affine", -y[1], x[1] - y[2]))
        if code == Opcode.MUL and "const" in (x[0], y[0]):
            (_, s, t), (_, k) = (x, y) if x[0] == "affine" else (y, x)
            return ("affine", s * k, t * k)
        if code == Opcode.DIV and x[0] == "affine" and y[0] == "const":
            return ("affine", x[1] / y[1], x[2] / y[1])
        return None
    if x[0] != "affine":
        return None
    if code == Opcode.NEG:
        return ("affine", -x[1], -x[2])
    if code == Opcode.DETACH:
        return x
    if code == Opcode.BATCH_NORM:
        # (C,) vectors, as F.batch_norm takes them
        stats = [extras[b + i].reshape(-1).to(dtype) for i in range(4 if c else 2)]
        g = torch.rsqrt(stats[1] + float(scalars[d]))
        if c:
            g = g * stats[2]
        shift = (x[2] - stats[0]) * g
        return ("affine", x[1] * g, shift + stats[3] if c else shift)
    return None


def _shift_values(program: Sequence[int], k: int) -> List[int]:
    """Instructions k.. of ``program`` as a program of their own: value k becomes value 0
    (no instruction reads a value before k: ``_affine_prefix``)."""
    out: List[int] = []
    for row in ops._split(program)[k:]:
        kinds = ops._FIELDS[Opcode(row[0])]
        out += [row[0]] + [x - k if j < len(kinds) and kinds[j] == "v" else x
                           for j, x in enumerate(row[1:])]
    return out


_CL_WEIGHT = "channels_last_3d"


def _weight_channels_last(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in channels_last_3d, the copy cached like ``_packed_weight``."""
    cl = torch.channels_last_3d
    if weight.is_contiguous(memory_format=cl) or not weight.is_cuda:
        return weight.contiguous(memory_format=cl)
    return _cached_copy(weight, (_CL_WEIGHT,),
                        lambda w: w.detach().contiguous(memory_format=cl))


def _pass_applies(plan: "_Plan", input: torch.Tensor) -> bool:
    """Whether the epilogue pass can run the call's bias and program (``plan``): switched on,
    a decoded program without SOFTMAX / LAYER_NORM, an output whose spatial dimensions
    collapse, and an input dtype whose conv output the pass reads (float32, float16,
    bfloat16; the output is that dtype or float32)."""
    return (EPILOGUE_PASS and plan.passable and plan.fallback is None
            and (plan.dtype == input.dtype or plan.dtype == torch.float32))


def _prog_f(plan: "_Plan", extras) -> torch.Tensor:
    """The program's float operands, with the values read from 0-d extras patched in."""
    if not plan.patches:
        return plan.prog_f
    prog_f = plan.prog_f.clone()
    for row, field, idx in plan.patches:
        prog_f[row, field] = float(extras[idx])
    return prog_f


def _run_pass(ext, plan: "_Plan", y: torch.Tensor, bias, extras, out: torch.Tensor):
    """``out`` = the program of ``plan`` on ``y`` + ``bias`` (``y``: the conv output without
    its bias; ``out`` may be ``y``): one launch of the epilogue pass. Poisons ``out`` first
    under ``POISON_OUTPUT`` (unless it is ``y``)."""
    if POISON_OUTPUT and out is not y:
        out.fill_(float("nan"))
    global LAST_PASS_KERNEL
    slots = [extras[i] for i in plan.slot_extras]
    ran = ext.epilogue_pass(y, None if bias is None else bias.contiguous(), out, slots,
                            plan.slot_strides, plan.prog_i, _prog_f(plan, extras), plan.regs,
                            lite=int(PASS_LITE))
    LAST_PASS_KERNEL = _PASS_KERNELS.get(ran)
    return out


def _cudnn_pass(ext, plan: "_Plan", args: tuple) -> torch.Tensor:
    """The "cudnn_pass" candidate: the reference's conv (``F.conv_transpose3d`` on the input
    and weight as given, without the bias; cuDNN flags as the caller set them), then the bias
    and program in one epilogue pass, in place where the conv output has the output's layout
    and dtype."""
    input, weight, bias, st, pa, op, di, g, program, scalars, extras = args
    y = F.conv_transpose3d(input, weight, None, list(st), list(pa), list(op), g, list(di))
    if y.dtype == plan.dtype and y.stride() == tuple(plan.stride):
        out = y
    else:
        out = torch.empty_strided(plan.shape, plan.stride, dtype=plan.dtype, device=input.device)
    return _run_pass(ext, plan, y, bias, extras, out)


def _cuda_event_ms(fn, calls: int = 1) -> float:
    """GPU time per call of ``calls`` back-to-back calls of ``fn`` on the current stream, in ms
    (CUDA events around the burst)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


# The autotune times bursts of back-to-back calls lasting about this long (ms): a single call
# timed between two events also counts the host's time to reach its first launch (the fused
# op's Python preamble, tens of us), which a model running ahead of the GPU hides. A burst
# measures the cost per call in a stream of calls: the GPU time where the GPU is the limit, the
# host's where the host is (small layers at batch 1).
BURST_MS = 0.5
_BURST_MAX = 32
_last_timings: Dict[str, float] = {}  # the last _pick_fastest call's medians


def _pick_fastest(cands, reps: int = 7, timer=None) -> str:
    """Name of the fastest of ``cands`` ((name, fn) pairs, in order of preference on a tie):
    each runs twice untimed, then ``reps`` rounds time every candidate once, in turn, and the
    lowest median wins. Interleaving the candidates means a GPU clock still ramping up from
    idle, or another process's burst, slows all of them alike instead of the first one timed.
    ``timer(fn) -> ms`` defaults to CUDA events on the current stream around a burst of
    back-to-back calls (the same count for every candidate: BURST_MS over the fastest second
    warm-up call, at most 32). The medians are left in ``_last_timings``."""
    global _last_timings
    est = []
    for _, fn in cands:
        fn()
        if timer is None:
            est.append(_cuda_event_ms(fn))
        else:
            fn()
    if timer is None:
        calls = max(1, min(_BURST_MAX, int(BURST_MS / max(min(est), 1e-3) + 0.5)))
        timer = lambda fn: _cuda_event_ms(fn, calls)  # noqa: E731
    ts = [[] for _ in cands]
    for _ in range(reps):
        for i, (_, fn) in enumerate(cands):
            ts[i].append(timer(fn))
    medians = [(sorted(t)[reps // 2], i) for i, t in enumerate(ts)]
    _last_timings = {cands[i][0]: m for m, i in medians}
    return cands[min(medians)[1]][0]


def _memo_pick(choices: dict, timings: dict, key, cands) -> str:
    """The choice kept in ``choices`` under ``key``, else ``_pick_fastest(cands)``, kept there
    with its candidates' medians in ``timings`` (both emptied past 1024 signatures): the
    autotune of the kernels that run after a site (``pool_tail``, ``norm_tail``)."""
    choice = choices.get(key)
    if choice is None:
        choice = _pick_fastest(cands)
        if len(choices) >= 1024:
            choices.clear()
            timings.clear()
        choices[key] = choice
        timings[key] = dict(_last_timings)
    return choice


def _tunable(input) -> bool:
    if not AUTOTUNE or POISON_OUTPUT or torch.cuda.is_current_stream_capturing():
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    return not (compiling is not None and compiling())


# Repacked weights, kept while the weight tensor is unchanged: the key holds its storage
# pointer, layout and version counter (bumped by every in-place update: optimizer steps,
# load_state_dict, copy_), so a stale copy is never used. Costs one extra copy of each weight.
_PACKED_MAX = 256
_packed: Dict[tuple, Tuple["weakref.ref", torch.Tensor]] = {}


def _cached_copy(weight: torch.Tensor, tag: tuple, make) -> torch.Tensor:
    """``make(weight)``, kept in ``_packed`` under ``tag`` and the weight's storage pointer,
    layout and version counter (not for inference tensors, which have no version counter, nor
    while a CUDA graph is captured)."""
    key = None
    if not (torch.is_inference_mode_enabled() and weight.is_inference()):
        key = tag + (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype,
                     weight.device, weight._version)
        hit = _packed.get(key)
        if hit is not None and hit[0]() is weight:
            return hit[1]
    copy = make(weight)
    if key is not None and not (weight.is_cuda and torch.cuda.is_current_stream_capturing()):
        if len(_packed) >= _PACKED_MAX:
            _packed.clear()
        _packed[key] = (weakref.ref(weight), copy)
    return copy


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out/g, kD, kH, kW) view of a copy whose C_out dimension is contiguous, so the
    kernel's weight loads coalesce across output channels."""
    return _cached_copy(weight, (), lambda w: w.detach().permute(2, 3, 4, 0, 1).contiguous()
                        .permute(3, 4, 0, 1, 2))


def _round_tf32_(t: torch.Tensor) -> torch.Tensor:
    """Rounds float32 values in place to TF32 (10 mantissa bits), to nearest with ties away
    from zero: the rounding of the kernel's ``cvt.rna.tf32.f32``."""
    bits = t.view(torch.int32)
    bits.add_(0x1000).bitwise_and_(-0x2000)
    return t


def _packed_weight_igemm(weight: torch.Tensor, ck: int, bn: int) -> torch.Tensor:
    """(kD, kH, kW, C_out padded to bn, C_in padded to ck) contiguous copy, C_in fastest, for
    the channels-last implicit GEMM; float32 values rounded to TF32. Cached like
    ``_packed_weight``."""
    def make(weight):
        cin, cout = weight.size(0), weight.size(1)
        cp, cout_p = -(-cin // ck) * ck, -(-cout // bn) * bn
        w = weight.detach().permute(2, 3, 4, 1, 0)
        wp = torch.zeros(*w.shape[:3], cout_p, cp, dtype=weight.dtype, device=weight.device)
        wp[..., :cout, :cin] = w
        if wp.dtype == torch.float32:
            _round_tf32_(wp)
        return wp
    return _cached_copy(weight, ("igemm", ck, bn), make)


def _packed_weight_wgmma_bulk(weight: torch.Tensor, ck: int, bn: int) -> torch.Tensor:
    """``_packed_weight_igemm``'s weight with each tap's bytes blocked for the bulk-copy wgmma
    configurations: per tap, (K chunk, block of bn output channels, 16-byte piece of the chunk,
    channel of the block, the piece's values), so that one chunk's B tile of one channel block
    is bn x (ck x element size) contiguous bytes in the shared-memory stage's plane order. Same
    shape and dtype as the unblocked weight; cached like it."""
    def make(weight):
        wp = _packed_weight_igemm(weight, ck, bn)
        kd, kh, kw, cout_p, cp = wp.shape
        per = 16 // wp.element_size()  # values per 16-byte piece
        v = wp.reshape(kd * kh * kw, cout_p // bn, bn, cp // ck, ck // per, per)
        return v.permute(0, 3, 1, 4, 2, 5).contiguous().reshape(wp.shape)
    return _cached_copy(weight, ("igemm_bulk", ck, bn), make)


def _run_fused(ext, plan, input, weight, bias, extras, mode):
    out = torch.empty_strided(plan.shape, plan.stride, dtype=plan.dtype, device=input.device)
    if out.numel() == 0:
        return out
    if POISON_OUTPUT:
        out.fill_(float("nan"))
    prog_f = _prog_f(plan, extras)
    if ALGO not in _ALGO_CODE:
        raise ValueError(f"ct3d_fx._cuda.ALGO must be one of {sorted(_ALGO_CODE)}, got {ALGO!r}")
    bias_c = None if bias is None else bias.contiguous()
    slots = [extras[i] for i in plan.slot_extras]
    global LAST_KERNEL, LAST_WGMMA, LAST_WGMMA_BULK
    if plan.wline or (mode == _MODE_TENSOR_CORE and plan.igemm_ok
                      and (ALGO == "igemm" or (ALGO == "auto" and plan.igemm_auto))):
        ck, bn, config, bm, splits = plan.igemm_tiles
        bulk = config in IGEMM_WGMMA_BULK_CONFIGS
        wpk = (_packed_weight_wgmma_bulk(weight, ck, bn) if bulk
               else _packed_weight_igemm(weight, ck, bn))
        ran = ext.launch_igemm(input, weight, bias_c, out, slots, plan.slot_strides,
                               plan.prog_i, prog_f, plan.regs, plan.conv, wpk, ck, bn, config,
                               bm, splits)
        if ran == 4:  # the bulk configuration cannot run here: its fallback, from now on
            fb = _BULK_FALLBACK[config]
            plan.igemm_tiles = (ck, bn, fb, IGEMM_CONFIGS[fb][1], splits)
            ran = ext.launch_igemm(input, weight, bias_c, out, slots, plan.slot_strides,
                                   plan.prog_i, prog_f, plan.regs, plan.conv,
                                   _packed_weight_igemm(weight, ck, bn), ck, bn, fb,
                                   IGEMM_CONFIGS[fb][1], splits)
        LAST_WGMMA = ran in (3, 5)
        LAST_WGMMA_BULK = ran == 5
        LAST_KERNEL = "igemm"
        return out
    wp = _packed_weight(weight)
    algo = _ALGO_CODE[ALGO]
    if algo == 0 and DIRECT_STAGED_AUTO:
        algo = _ALGO_AUTO_STAGED
    kernel = ext.launch(input, wp, bias_c, out, slots, plan.slot_strides, plan.prog_i,
                        prog_f, plan.regs, plan.conv, mode, algo)
    LAST_KERNEL = {0: "gemm", 1: "direct", 2: "direct_staged"}.get(kernel)
    return out


@conv_transpose3d_epilogue.register_kernel("cuda")
def _cuda_impl(input, weight, bias, stride, padding, output_padding, dilation, groups,
               program, scalars, extras):
    args = (input, weight, bias, stride, padding, output_padding, dilation, groups, program,
            scalars, extras)
    return run(args)


def run(args: tuple) -> torch.Tensor:
    """The op's CUDA implementation on ``args`` (the op's 11 arguments): the fused kernel, or
    the reference where the kernel does not apply or the autotune measured it slower. The
    checks of ``ops.check_args`` run once per call signature (every value they read is part of
    the plan key; the plan records that they passed). ``fuse.FusedSite`` calls this directly,
    without the dispatcher, when no autograd, tracing or dispatch mode is involved (about 40 us
    less host time per site)."""
    key = _key(*args)
    plan = _plans.get(key)
    if plan is None or not plan.checked:
        check_args(*args)
    ext = _build.load()
    if ext is None:
        return reference(*args)
    if plan is None:
        plan = _plan_for(key, args)
    plan.checked = True
    input, weight, bias, extras = args[0], args[1], args[2], args[10]
    if input.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        mode = _MODE_FFMA
    else:
        mode = _MODE_TENSOR_CORE
    if plan.fallback is not None or (plan.wline and mode == _MODE_FFMA):
        # the W-line tiles run on the tensor cores only; where the LayerNorm is what keeps the
        # call off the kernel, the kernel still runs the conv and the ops before it
        if plan.ln_split is not None:
            return _run_split(args, plan.ln_split)
        return reference(*args)
    if _tunable(input):
        ck = (key, mode)
        choice = _choices.get(ck)
        if choice is None:
            # in order of preference on a tie
            cands = [("fused", lambda: _run_fused(ext, plan, input, weight, bias, extras, mode)),
                     ("reference", lambda: reference(*args))]
            passes = _pass_applies(plan, input)
            if _channels_last_applies(input):
                cands.append(("cudnn_channels_last", lambda: _reference_channels_last(
                    args, plan.shape, plan.stride, plan.dtype)))
                if passes:
                    cands.append(("cudnn_channels_last_pass", lambda: _reference_channels_last(
                        args, plan.shape, plan.stride, plan.dtype, plan)))
            if passes and CUDNN_PASS:
                cands.append(("cudnn_pass", lambda: _cudnn_pass(ext, plan, args)))
            if _subpixel_applies(input, weight, args[7], args[3]):
                cands.append(("subpixel", lambda: _reference_subpixel(
                    args, plan.shape, plan.stride, plan.dtype)))
            choice = _pick_fastest(cands)
            _choices[ck] = choice
            _timings[ck] = dict(_last_timings)
            global _decisions, _last_decision
            _decisions += 1
            _last_decision = choice
        if choice == "reference":
            return reference(*args)
        if choice == "cudnn_channels_last":
            return _reference_channels_last(args, plan.shape, plan.stride, plan.dtype)
        if choice == "cudnn_channels_last_pass":
            return _reference_channels_last(args, plan.shape, plan.stride, plan.dtype, plan)
        if choice == "cudnn_pass":
            return _cudnn_pass(ext, plan, args)
        if choice == "subpixel":
            return _reference_subpixel(args, plan.shape, plan.stride, plan.dtype)
    return _run_fused(ext, plan, input, weight, bias, extras, mode)
