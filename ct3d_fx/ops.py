"""The fused op ``ct3d::conv_transpose3d_epilogue``: schema, epilogue program, reference, fake.

One op with one fixed, typed schema serves every fused site::

    ct3d::conv_transpose3d_epilogue(
        Tensor input, Tensor weight, Tensor? bias,
        int[] stride, int[] padding, int[] output_padding, int[] dilation, int groups,
        int[] program, float[] scalars, Tensor[] extras) -> Tensor

``program`` encodes the epilogue as straight-line code over numbered values. Value 0 is the
transposed convolution's output (bias included). Instruction ``i`` (six ints,
``[opcode, a, b, c, d, e]``) defines value ``i + 1``; the op returns the last value. Operands
``a``..``e`` are value numbers, scalar indices (into ``scalars``), extra-tensor indices (into
``extras``) or flags, as :class:`Opcode` documents per opcode; ``-1`` means "absent".

The default (CPU and fallback) implementation is the reference: ``F.conv_transpose3d`` and then
the program interpreted with the very PyTorch ops the original graph used, so results are equal
to the unfused model's. The CUDA implementation (registered below when the extension builds)
computes the convolution and the whole program in one kernel.
"""
from __future__ import annotations

import enum
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Opcode", "INSTR_WIDTH", "conv_transpose3d_epilogue", "reference", "check_args",
           "check_program", "describe_program"]

INSTR_WIDTH = 6


class Opcode(enum.IntEnum):
    """Epilogue opcodes. Each instruction is ``[opcode, a, b, c, d, e]``; unused fields are -1.

    Legend: ``v`` value number, ``s`` scalar index, ``t`` extra-tensor index, ``f`` flag,
    ``dim`` a dimension of the 5-D output (SOFTMAX: 1 or -4, the channels), ``T`` an optional
    extra-tensor index (-1: absent), ``n`` a positive int.
    """

    LOAD_SCALAR = 1   # a=s                      -> scalars[a] (a Python float)
    LOAD_TENSOR = 2   # a=t                      -> extras[a] (broadcast like the original op)
    ADD = 10          # a=v, b=v                 -> a + b
    SUB = 11          # a=v, b=v                 -> a - b
    MUL = 12          # a=v, b=v                 -> a * b
    DIV = 13          # a=v, b=v                 -> a / b (true division)
    NEG = 20          # a=v
    ABS = 21          # a=v
    SQUARE = 22       # a=v                      -> a * a
    RELU = 23         # a=v
    LEAKY_RELU = 24   # a=v, b=s slope
    PRELU = 25        # a=v, b=t weight (1 or C elements)
    ELU = 26          # a=v, b=s alpha
    CELU = 27         # a=v, b=s alpha
    SELU = 28         # a=v
    GELU = 29         # a=v, b=f (0: exact erf form, 1: tanh approximation)
    SILU = 30         # a=v
    MISH = 31         # a=v
    HARDSWISH = 32    # a=v
    HARDSIGMOID = 33  # a=v
    HARDTANH = 34     # a=v, b=s min, c=s max   (relu6 is hardtanh(0, 6))
    SIGMOID = 35      # a=v
    TANH = 36         # a=v
    SOFTPLUS = 37     # a=v, b=s beta, c=s threshold
    CLAMP = 38        # a=v, b=s min or -1, c=s max or -1
    BATCH_NORM = 39   # a=v, b=t running_mean (running_var is t b+1; weight, bias are t b+2, b+3
    #                   when c=1, absent when c=0), d=s eps. Eval mode: running statistics.
    DETACH = 40       # a=v                      -> a.detach(): the same values, no gradient
    SOFTMAX = 41      # a=v, b=f (0: softmax, 1: log_softmax), c=dim (1 or -4): over the
    #                   channels of the 5-D value a (a must be computed from the conv output)
    LAYER_NORM = 42   # a=v, b=t weight or -1, c=t bias or -1, d=s eps, e=n the normalized size:
    #                   F.layer_norm(a, (e,), weight, bias, eps), over the last dimension (W) of
    #                   the 5-D value a (a must be computed from the conv output)


# Which fields of each opcode are value numbers (v), scalar indices (s), extra-tensor indices
# (t), flags (f) or optional scalar indices (s?, -1 allowed). Drives validation and printing.
_FIELDS = {
    Opcode.LOAD_SCALAR: "s", Opcode.LOAD_TENSOR: "t",
    Opcode.ADD: "vv", Opcode.SUB: "vv", Opcode.MUL: "vv", Opcode.DIV: "vv",
    Opcode.NEG: "v", Opcode.ABS: "v", Opcode.SQUARE: "v", Opcode.RELU: "v",
    Opcode.LEAKY_RELU: "vs", Opcode.PRELU: "vt", Opcode.ELU: "vs", Opcode.CELU: "vs",
    Opcode.SELU: "v", Opcode.GELU: "vf", Opcode.SILU: "v", Opcode.MISH: "v",
    Opcode.HARDSWISH: "v", Opcode.HARDSIGMOID: "v", Opcode.HARDTANH: "vss",
    Opcode.SIGMOID: "v", Opcode.TANH: "v", Opcode.SOFTPLUS: "vss",
    Opcode.CLAMP: "v??", Opcode.BATCH_NORM: "vtfs", Opcode.DETACH: "v",
    Opcode.SOFTMAX: "vfd", Opcode.LAYER_NORM: "vTTsn",
}
# opcodes that reduce over other elements of the value: the operand must be the conv output or
# computed from it (the kernel reduces over its own output tile)
_REDUCING = (Opcode.SOFTMAX, Opcode.LAYER_NORM)
# dims a SOFTMAX may name: the channel dimension of a 5-D value
_SOFTMAX_DIMS = (1, -4)


def _split(program: Sequence[int]) -> List[List[int]]:
    return [list(program[i:i + INSTR_WIDTH]) for i in range(0, len(program), INSTR_WIDTH)]


def check_program(program: Sequence[int], n_scalars: int, n_extras: int) -> None:
    """Validate an encoded epilogue program; raise ValueError naming the bad instruction.

    Besides the field ranges, every value is typed: the convolution output and what is computed
    from it ("conv"), extra tensors ("tensor") and scalars ("scalar"). Unary ops and the first
    operand of PRELU/BATCH_NORM need a tensor value, a binary op needs at least one tensor
    operand, and the last value must be computed from the convolution output.
    """
    if len(program) % INSTR_WIDTH:
        raise ValueError(f"ct3d: program length must be a multiple of {INSTR_WIDTH}, "
                         f"got {len(program)}")
    kinds_of = ["conv"]                      # kind of each value number
    for i, ins in enumerate(_split(program)):
        try:
            op = Opcode(ins[0])
        except ValueError:
            raise ValueError(f"ct3d: program instruction {i}: unknown opcode {ins[0]}") from None
        kinds = _FIELDS[op]
        for j, x in enumerate(ins[1:]):
            kind = kinds[j] if j < len(kinds) else "-"
            what = f"ct3d: program instruction {i} ({op.name}) field {j + 1}"
            if kind == "v" and not 0 <= x <= i:
                raise ValueError(f"{what}: value number must be in [0, {i}], got {x}")
            if kind == "s" and not 0 <= x < n_scalars:
                raise ValueError(f"{what}: scalar index must be in [0, {n_scalars}), got {x}")
            if kind == "?" and not -1 <= x < n_scalars:
                raise ValueError(f"{what}: scalar index must be -1 or in [0, {n_scalars}), got {x}")
            if kind == "t":
                need = 1
                if op == Opcode.BATCH_NORM:
                    need = 4 if ins[3] == 1 else 2
                if not (0 <= x and x + need <= n_extras):
                    raise ValueError(f"{what}: extra-tensor index must leave {need} tensor(s) in "
                                     f"[0, {n_extras}), got {x}")
            if kind == "T" and not -1 <= x < n_extras:
                raise ValueError(f"{what}: extra-tensor index must be -1 or in [0, {n_extras}), "
                                 f"got {x}")
            if kind == "n" and x < 1:
                raise ValueError(f"{what}: size must be positive, got {x}")
            if kind == "f" and x not in (0, 1):
                raise ValueError(f"{what}: flag must be 0 or 1, got {x}")
            if kind == "d" and x not in _SOFTMAX_DIMS:
                raise ValueError(f"{what}: dim must be 1 or -4 (the channels of the 5-D output), "
                                 f"got {x}")
            if kind == "-" and x != -1:
                raise ValueError(f"{what}: unused field must be -1, got {x}")
        if op == Opcode.LOAD_SCALAR:
            kinds_of.append("scalar")
            continue
        if op == Opcode.LOAD_TENSOR:
            kinds_of.append("tensor")
            continue
        operands = [kinds_of[ins[1]]]
        if kinds == "vv":
            operands.append(kinds_of[ins[2]])
            if "conv" not in operands and "tensor" not in operands:
                raise ValueError(f"ct3d: program instruction {i} ({op.name}): both operands are "
                                 f"scalars, expected at least one tensor value")
        elif operands[0] == "scalar":
            raise ValueError(f"ct3d: program instruction {i} ({op.name}): operand v{ins[1]} is "
                             f"a scalar, expected a tensor value")
        elif op in _REDUCING and operands[0] != "conv":
            raise ValueError(f"ct3d: program instruction {i} ({op.name}): operand v{ins[1]} is "
                             f"an extra tensor, expected a value computed from the convolution "
                             f"output (value 0)")
        kinds_of.append("conv" if "conv" in operands else "tensor")
    if kinds_of[-1] != "conv":
        raise ValueError("ct3d: program's last value must be computed from the convolution output "
                         f"(value 0), got a {kinds_of[-1]} value")


def describe_program(program: Sequence[int], scalars: Sequence[float]) -> str:
    """A one-line human-readable form of a program, e.g. ``v1=RELU(v0)``."""
    out = []
    for i, ins in enumerate(_split(program)):
        op = Opcode(ins[0])
        args = []
        for kind, x in zip(_FIELDS[op], ins[1:]):
            if kind == "v":
                args.append(f"v{x}")
            elif kind in "s?":
                args.append("-" if x < 0 else repr(scalars[x]))
            elif kind == "t" or (kind == "T" and x >= 0):
                args.append(f"t{x}")
            elif kind == "T":
                args.append("-")
            elif kind == "d":
                args.append(f"dim={x}")
            else:
                args.append(str(x))
        out.append(f"v{i + 1}={op.name}({', '.join(args)})")
    return "; ".join(out)


def _run_program(y: torch.Tensor, program: Sequence[int], scalars: Sequence[float],
                 extras: Sequence[torch.Tensor]):
    """Interpret ``program`` on ``y`` with the PyTorch ops the original graph used."""
    vals: list = [y]
    s = scalars
    for ins in _split(program):
        op, a, b, c, d, _ = ins
        if op == Opcode.LOAD_SCALAR:
            r = s[a]
        elif op == Opcode.LOAD_TENSOR:
            r = extras[a]
        else:
            x = vals[a]
            if op == Opcode.ADD:
                r = x + vals[b]
            elif op == Opcode.SUB:
                r = x - vals[b]
            elif op == Opcode.MUL:
                r = x * vals[b]
            elif op == Opcode.DIV:
                r = x / vals[b]
            elif op == Opcode.NEG:
                r = torch.neg(x)
            elif op == Opcode.ABS:
                r = torch.abs(x)
            elif op == Opcode.SQUARE:
                r = torch.square(x)
            elif op == Opcode.RELU:
                r = torch.relu(x)
            elif op == Opcode.LEAKY_RELU:
                r = F.leaky_relu(x, s[b])
            elif op == Opcode.PRELU:
                r = F.prelu(x, extras[b])
            elif op == Opcode.ELU:
                r = F.elu(x, s[b])
            elif op == Opcode.CELU:
                r = F.celu(x, s[b])
            elif op == Opcode.SELU:
                r = F.selu(x)
            elif op == Opcode.GELU:
                r = F.gelu(x, approximate="tanh" if b else "none")
            elif op == Opcode.SILU:
                r = F.silu(x)
            elif op == Opcode.MISH:
                r = F.mish(x)
            elif op == Opcode.HARDSWISH:
                r = F.hardswish(x)
            elif op == Opcode.HARDSIGMOID:
                r = F.hardsigmoid(x)
            elif op == Opcode.HARDTANH:
                r = F.hardtanh(x, s[b], s[c])
            elif op == Opcode.SIGMOID:
                r = torch.sigmoid(x)
            elif op == Opcode.TANH:
                r = torch.tanh(x)
            elif op == Opcode.SOFTPLUS:
                r = F.softplus(x, s[b], s[c])
            elif op == Opcode.CLAMP:
                r = torch.clamp(x, None if b < 0 else s[b], None if c < 0 else s[c])
            elif op == Opcode.DETACH:
                r = x.detach()
            elif op == Opcode.SOFTMAX:
                r = F.log_softmax(x, dim=c) if b else F.softmax(x, dim=c)
            elif op == Opcode.LAYER_NORM:
                r = F.layer_norm(x, (ins[5],), extras[b] if b >= 0 else None,
                                 extras[c] if c >= 0 else None, s[d])
            elif op == Opcode.BATCH_NORM:
                w = extras[b + 2] if c else None
                bb = extras[b + 3] if c else None
                r = F.batch_norm(x, extras[b], extras[b + 1], w, bb, False, 0.0, s[d])
            else:  # check_program rejects unknown opcodes before we get here
                raise AssertionError(op)
        vals.append(r)
    return vals[-1]


def _triple(name: str, v: Sequence[int]) -> List[int]:
    v = list(v)
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise ValueError(f"ct3d: {name} must have 1 or 3 elements, got {len(v)}: {v}")
    return v


def check_args(input, weight, bias, stride, padding, output_padding, dilation, groups,
               program, scalars, extras) -> None:
    """Check the op's arguments with PyTorch's own conditions; errors name argument and value.

    Raises:
        ValueError: bad rank, channel count, stride/padding/output_padding/dilation/groups,
            program encoding, or an output size that is not positive.
        TypeError: mismatched or non-floating dtypes.
        RuntimeError: tensors on different devices.
    """
    if input.dim() != 5:
        raise ValueError(f"ct3d: input must be 5-D (N, C_in, D, H, W), got {input.dim()}-D "
                         f"shape {tuple(input.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"ct3d: weight must be 5-D (C_in, C_out/groups, kD, kH, kW), got "
                         f"{weight.dim()}-D shape {tuple(weight.shape)}")
    if groups < 1:
        raise ValueError(f"ct3d: groups must be >= 1, got {groups}")
    if input.size(1) != weight.size(0):
        raise ValueError(f"ct3d: input has {input.size(1)} channels, expected {weight.size(0)} "
                         f"(weight.size(0))")
    if weight.size(0) % groups:
        raise ValueError(f"ct3d: weight.size(0)={weight.size(0)} (C_in) must be divisible by "
                         f"groups={groups}")
    c_out = weight.size(1) * groups
    if not input.dtype.is_floating_point:
        raise TypeError(f"ct3d: input must be a floating-point tensor, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"ct3d: weight dtype {weight.dtype} must match input dtype {input.dtype}")
    if weight.device != input.device:
        raise RuntimeError(f"ct3d: weight is on {weight.device}, expected {input.device} "
                           f"(the input's device)")
    if bias is not None:
        if bias.dim() != 1 or bias.numel() != c_out:
            raise ValueError(f"ct3d: bias must be 1-D with {c_out} elements (C_out), got shape "
                             f"{tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"ct3d: bias dtype {bias.dtype} must match input dtype {input.dtype}")
        if bias.device != input.device:
            raise RuntimeError(f"ct3d: bias is on {bias.device}, expected {input.device}")
    st = _triple("stride", stride)
    pa = _triple("padding", padding)
    op = _triple("output_padding", output_padding)
    di = _triple("dilation", dilation)
    for i in range(3):
        if st[i] < 1:
            raise ValueError(f"ct3d: stride must be positive, got {st}")
        if di[i] < 1:
            raise ValueError(f"ct3d: dilation must be positive, got {di}")
        if pa[i] < 0:
            raise ValueError(f"ct3d: padding must be non-negative, got {pa}")
        if op[i] < 0:
            raise ValueError(f"ct3d: output_padding must be non-negative, got {op}")
        if op[i] >= max(st[i], di[i]):
            raise ValueError(f"ct3d: output_padding must be smaller than either stride or "
                             f"dilation, got output_padding={op}, stride={st}, dilation={di}")
    out_sp = list(output_shape(input, weight, st, pa, op, di, groups)[2:])
    if min(out_sp) < 1:
        raise ValueError(f"ct3d: output spatial size {out_sp} is not positive for input "
                         f"{tuple(input.shape)}, kernel {tuple(weight.shape[2:])}, stride {st}, "
                         f"padding {pa}, output_padding {op}, dilation {di}")
    check_program(program, len(scalars), len(extras))
    for i, t in enumerate(extras):
        if not t.is_floating_point():
            raise TypeError(f"ct3d: extras[{i}] must be a floating-point tensor, got {t.dtype}")
        if t.device != input.device and not (t.dim() == 0 and t.device.type == "cpu"):
            raise RuntimeError(f"ct3d: extras[{i}] is on {t.device}, expected {input.device} "
                               f"(only 0-d CPU tensors may stay on the CPU)")


def output_shape(input, weight, stride, padding, output_padding, dilation, groups):
    """Shape ``(N, C_out, D_out, H_out, W_out)`` of the transposed convolution."""
    st, pa, op, di = (_triple(n, v) for n, v in (("stride", stride), ("padding", padding),
                                                  ("output_padding", output_padding),
                                                  ("dilation", dilation)))
    sp = [(input.size(2 + i) - 1) * st[i] - 2 * pa[i] + di[i] * (weight.size(2 + i) - 1)
          + op[i] + 1 for i in range(3)]
    return (input.size(0), weight.size(1) * groups, *sp)


def reference(input, weight, bias, stride, padding, output_padding, dilation, groups,
              program, scalars, extras):
    """The reference implementation: ``F.conv_transpose3d`` then the program in PyTorch ops."""
    y = F.conv_transpose3d(input, weight, bias, list(stride), list(padding),
                           list(output_padding), groups, list(dilation))
    return _run_program(y, program, scalars, extras)


_SCHEMA = ("(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
           "int[] output_padding, int[] dilation, int groups, int[] program, float[] scalars, "
           "Tensor[] extras) -> Tensor")


@torch.library.custom_op("ct3d::conv_transpose3d_epilogue", mutates_args=(), schema=_SCHEMA)
def conv_transpose3d_epilogue(input: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], stride: Sequence[int],
                              padding: Sequence[int], output_padding: Sequence[int],
                              dilation: Sequence[int], groups: int, program: Sequence[int],
                              scalars: Sequence[float], extras: Sequence[torch.Tensor]
                              ) -> torch.Tensor:
    """ConvTranspose3d and its epilogue (elementwise ops, softmax over the channels, LayerNorm
    over W) in one op.

    Args:
        input: (N, C_in, D, H, W), float32/float64/float16/bfloat16, NCDHW or channels_last_3d.
        weight: (C_in, C_out/groups, kD, kH, kW), same dtype and device as ``input``.
        bias: (C_out,) or None, same dtype and device.
        stride, padding, output_padding, dilation: 3 ints each (or 1, repeated), in voxels.
        groups: int >= 1 dividing C_in.
        program: the epilogue, ``INSTR_WIDTH`` ints an instruction (see :class:`Opcode`).
        scalars: Python floats the program refers to.
        extras: tensors the program refers to (per-channel vectors, BatchNorm statistics,
            side inputs), each broadcasting against the convolution output like in the
            original graph.

    Returns:
        The program's last value: (N, C_out, D_out, H_out, W_out) when the extras broadcast to
        the convolution output; dtype by PyTorch's type promotion over the epilogue.

    Raises:
        ValueError, TypeError, RuntimeError: see :func:`check_args`.

    Limitations:
        The CPU implementation is the reference (not fused). The CUDA kernel falls back to the
        reference for float64, for extras that enlarge the output by broadcasting, for a
        SOFTMAX with groups > 1 or more than 64 output channels, and when the extension could
        not be built.
    """
    check_args(input, weight, bias, stride, padding, output_padding, dilation, groups,
               program, scalars, extras)
    return reference(input, weight, bias, stride, padding, output_padding, dilation, groups,
                     program, scalars, extras)


@conv_transpose3d_epilogue.register_fake
def _fake(input, weight, bias, stride, padding, output_padding, dilation, groups, program,
          scalars, extras):
    torch._check(input.dim() == 5, lambda: f"ct3d: input must be 5-D, got {input.dim()}-D")
    torch._check(weight.dim() == 5, lambda: f"ct3d: weight must be 5-D, got {weight.dim()}-D")
    torch._check(input.size(1) == weight.size(0),
                 lambda: f"ct3d: input has {input.size(1)} channels, expected {weight.size(0)}")
    torch._check(groups >= 1 and weight.size(0) % groups == 0,
                 lambda: f"ct3d: groups={groups} must divide C_in={weight.size(0)}")
    torch._check(bias is None or (bias.dim() == 1 and bias.numel() == weight.size(1) * groups),
                 lambda: f"ct3d: bias must be 1-D with {weight.size(1) * groups} elements (C_out)")
    check_program(program, len(scalars), len(extras))
    return reference(input, weight, bias, stride, padding, output_padding, dilation, groups,
                     program, scalars, extras)


# The CUDA implementation registers itself for the "cuda" dispatch key; it builds the
# extension lazily at its first call and falls back to ``reference`` when it cannot.
from . import _cuda  # noqa: E402,F401
from . import _autograd  # noqa: E402,F401
