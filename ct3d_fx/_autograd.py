"""Autograd for ``ct3d::conv_transpose3d_epilogue`` (registered at import by ``ops``).

Forward saves no convolution output. Backward works in three steps:

1. Recompute the convolution output ``y = conv_transpose3d(input, weight, bias)`` with the fused
   op itself and an empty program (on CUDA that is the fused kernel), unless no needed
   gradient reads the values of ``y`` (e.g. ``y * scale + shift`` when ``scale`` needs no
   gradient, or an empty program); then a zero-strided stand-in of ``y``'s shape is used and
   ``input``, ``weight`` and ``bias`` are saved only where ``convolution_backward`` needs them
   (the input for the weight gradient, the weight for the input gradient).
2. Differentiate the epilogue: interpret the program on ``y`` with the same PyTorch ops as the
   reference (``ops._run_program``) under ``torch.enable_grad`` and take ``torch.autograd.grad``
   with respect to ``y`` and to every extra tensor that requires grad. Autograd reduces each
   extra's gradient to that extra's own shape (per-channel vectors, 0-d tensors, broadcast side
   inputs) and places it on that extra's device (0-d CPU scalars stay on the CPU).
3. ``aten.convolution_backward(..., transposed=True)`` turns ``dL/dy`` into the gradients of
   ``input``, ``weight`` and ``bias``.

Every step is made of differentiable ops, so double backward (``create_graph=True``,
``torch.autograd.gradgradcheck``) works: when backward runs with grad mode on, step 1 records the
recomputation through this same autograd formula and steps 2-3 keep their graphs.

Saved for backward (only when some gradient is needed): the input if the weight gradient
is needed or ``y`` must be recomputed; the weight if the input gradient is needed or ``y`` must
be recomputed; the bias only to recompute ``y``; the extras when the program is not empty.

Limitations:
    - The epilogue derivative runs as separate PyTorch ops (one kernel per instruction), not
      as one fused kernel, and the recomputation of ``y`` costs one extra transposed
      convolution per backward (it saves memory: ``y`` is never stored).
    - When only the input (weight) gradient is needed, ``convolution_backward`` receives a
      zero-strided stand-in for the weight (input), which it reads for its shape only; the
      backend's memory-format choice then follows the saved tensor alone.
    - As in PyTorch, BatchNorm is not differentiable with respect to its running statistics:
      a ``BATCH_NORM`` instruction whose running_mean/running_var extra requires grad raises
      ``RuntimeError`` in the forward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import ops
from .ops import INSTR_WIDTH, Opcode

__all__: List[str] = []

# Opcodes whose derivative never needs their operands' values.
_LINEAR = (Opcode.ADD, Opcode.SUB, Opcode.NEG)


def _bn_stat_requires_grad(program: Sequence[int], extra_needs: Sequence[bool]) -> Optional[str]:
    """Name the first BatchNorm running statistic that requires grad, or None."""
    for i in range(0, len(program), INSTR_WIDTH):
        if program[i] == Opcode.BATCH_NORM:
            t = program[i + 2]
            for k, what in ((t, "running_mean"), (t + 1, "running_var")):
                if extra_needs[k]:
                    return f"program instruction {i // INSTR_WIDTH} (BATCH_NORM) {what} extras[{k}]"
    return None


def _needs_conv_output(program: Sequence[int], conv_needs: bool,
                       extra_needs: Sequence[bool]) -> bool:
    """Whether the needed gradients depend on the values of the convolution output ``y``.

    ``conv_needs``: any of input, weight, bias needs a gradient. ``extra_needs``: per extra.
    A value "carries" a gradient when something that needs a gradient flows into it; a value
    "depends on y" when value 0 flows into it. ``y`` is needed as soon as one instruction's
    needed partial derivatives read an operand that depends on ``y``.
    """
    carries = [conv_needs]
    dep_y = [True]
    for i in range(0, len(program), INSTR_WIDTH):
        op, a, b, c = program[i:i + 4]
        if op == Opcode.LOAD_SCALAR:
            carries.append(False)
            dep_y.append(False)
            continue
        if op == Opcode.LOAD_TENSOR:
            carries.append(bool(extra_needs[a]))
            dep_y.append(False)
            continue
        if op in (Opcode.ADD, Opcode.SUB, Opcode.MUL, Opcode.DIV):
            ca, cb, da, db = carries[a], carries[b], dep_y[a], dep_y[b]
            if op == Opcode.MUL and ((ca and db) or (cb and da)):
                return True
            if op == Opcode.DIV and ((ca and db) or (cb and (da or db))):
                return True
            carries.append(ca or cb)
            dep_y.append(da or db)
            continue
        ca, da = carries[a], dep_y[a]
        if op == Opcode.DETACH:  # no gradient flows through it
            carries.append(False)
            dep_y.append(da)
            continue
        own = False  # an extra tensor of this instruction that needs a gradient
        if op == Opcode.PRELU:
            own = bool(extra_needs[b])
            if da and (ca or own):
                return True
        elif op == Opcode.LAYER_NORM:
            w_needs = b >= 0 and bool(extra_needs[b])
            own = w_needs or (c >= 0 and bool(extra_needs[c]))
            # d/dx and d/dweight read x (through its normalized values); d/dbias does not.
            if da and (ca or w_needs):
                return True
        elif op == Opcode.BATCH_NORM:
            n = 4 if c == 1 else 2
            own = any(extra_needs[b:b + n])
            # d/dx and d/dbias, d/drunning_mean do not read x; d/dweight does (x - mean).
            if da and (extra_needs[b + 1] or (c == 1 and extra_needs[b + 2])):
                return True
        elif op not in _LINEAR and ca and da:
            return True
        carries.append(ca or own)
        dep_y.append(da)
    return False


def _flat_needs(ctx, inputs) -> tuple:
    """``needs_input_grad`` as (input, weight, bias, [per extra]) from inside ``setup_context``.

    During forward, ``ctx.needs_input_grad`` is the flat tuple autograd.Function sees: the
    tensor list ``extras`` is spread out and non-empty int/float lists count as one entry each
    (empty ones as none), then one trailing entry for torch's metadata. When the layout is not
    the expected one (another torch version), fall back to ``requires_grad``.
    """
    x, w, b = inputs[0], inputs[1], inputs[2]
    program, scalars, extras = inputs[8], inputs[9], inputs[10]
    n = len(extras)
    needs = tuple(ctx.needs_input_grad)
    expected = 8 + (1 if len(program) else 0) + (1 if len(scalars) else 0) + n + 1
    if len(needs) == expected:
        return needs[0], needs[1], needs[2], list(needs[expected - 1 - n:expected - 1])
    return (x.requires_grad, w.requires_grad, b is not None and b.requires_grad,
            [t.requires_grad for t in extras])


def _setup_context(ctx, inputs, output) -> None:
    (x, w, b, stride, padding, output_padding, dilation, groups, program, scalars,
     extras) = inputs
    nx, nw, nb, ne = _flat_needs(ctx, inputs)
    program = [int(v) for v in program]
    bad = _bn_stat_requires_grad(program, ne)
    if bad is not None:
        raise RuntimeError(f"ct3d: {bad} requires grad, but batch norm is not differentiable "
                           f"with respect to its running statistics (as in PyTorch); detach "
                           f"it or set requires_grad=False")
    conv_needs = nx or nw or nb
    need_y = bool(program) and _needs_conv_output(program, conv_needs, ne)
    ctx.need_y = need_y
    ctx.n_extras = len(extras)
    ctx.has_bias = b is not None
    ctx.conv_args = (ops._triple("stride", stride), ops._triple("padding", padding),
                     ops._triple("output_padding", output_padding),
                     ops._triple("dilation", dilation), int(groups))
    ctx.program = program
    ctx.scalars = [float(s) for s in scalars]
    ctx.y_shape = ops.output_shape(x, w, *ctx.conv_args)
    ctx.y_dtype = x.dtype
    ctx.y_device = x.device
    ctx.x_shape = tuple(x.shape)
    ctx.w_shape = tuple(w.shape)
    keep_x = nw or need_y
    keep_w = nx or need_y
    keep_b = need_y and b is not None
    keep_extras = bool(program) and (conv_needs or any(ne))
    ctx.save_for_backward(x if keep_x else None, w if keep_w else None,
                          b if keep_b else None, *(extras if keep_extras else ()))


def _no_grad(arg):
    # register_autograd flattens an empty list like a tensor list: its "gradient" must be [].
    return [] if isinstance(arg, (list, tuple)) and len(arg) == 0 else None


def _stand_in(shape, ctx, requires_grad: bool = False) -> torch.Tensor:
    """A zero of ``shape`` (dtype and device of the input) that allocates one element."""
    z = torch.zeros((), dtype=ctx.y_dtype, device=ctx.y_device)
    return z.expand(shape).detach().requires_grad_(requires_grad)


def _use(t: torch.Tensor, needs_grad: bool, create_graph: bool) -> torch.Tensor:
    """The tensor the backward's program reads for one extras position."""
    if create_graph:
        return t.view_as(t) if needs_grad else t
    return t.detach().requires_grad_(needs_grad)


def _backward(ctx, grad):
    x, w, b, *extras = ctx.saved_tensors
    needs = ctx.needs_input_grad
    nx, nw, nb = bool(needs[0]), bool(needs[1]), bool(needs[2])
    ne = [bool(v) for v in needs[10]] if ctx.n_extras else []
    stride, padding, output_padding, dilation, groups = ctx.conv_args
    program, scalars = ctx.program, ctx.scalars
    conv_needs = nx or nw or nb
    create_graph = torch.is_grad_enabled()

    extra_grads: List[Optional[torch.Tensor]] = [None] * ctx.n_extras
    gy = None
    if not program:
        gy = grad
    elif conv_needs or any(ne):
        if ctx.need_y:
            y = torch.ops.ct3d.conv_transpose3d_epilogue(
                x, w, b, stride, padding, output_padding, dilation, groups, [], [], [])
            if not create_graph or not y.requires_grad:
                y = y.detach().requires_grad_(conv_needs)
        else:
            # The needed gradients do not read y's values: a zero stand-in of y's shape.
            y = _stand_in(ctx.y_shape, ctx, requires_grad=conv_needs)
        with torch.enable_grad():
            # One distinct tensor per extras position, so that a tensor passed twice (e.g.
            # extras=[s, s]) gets each position's gradient once; autograd sums them into s.
            uses = [_use(t, n, create_graph) for t, n in zip(extras, ne)]
            wrt = ([y] if conv_needs else []) + [u for u, n in zip(uses, ne) if n]
            out = ops._run_program(y, program, scalars, uses)
            got = torch.autograd.grad(out, wrt, grad, create_graph=create_graph,
                                      allow_unused=True)
        got = list(got)
        if conv_needs:
            gy = got.pop(0)
        for i, n in enumerate(ne):
            if n:
                extra_grads[i] = got.pop(0)

    gx = gw = gb = None
    if conv_needs and gy is not None:
        gy = gy.to(ctx.y_dtype)
        bias_sizes = [ctx.y_shape[1]] if ctx.has_bias else None
        # convolution_backward reads only the shape of input (weight) when it computes no
        # weight (input) gradient: a zero-strided stand-in keeps that tensor unsaved.
        if x is None:
            x = _stand_in(ctx.x_shape, ctx)
        if w is None:
            w = _stand_in(ctx.w_shape, ctx)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, w, bias_sizes, stride, padding, dilation, True, output_padding, groups,
            [nx, nw, nb and ctx.has_bias])
    return (gx if nx else None, gw if nw else None, gb if nb else None,
            None, None, None, None, None, _no_grad(program), _no_grad(scalars),
            extra_grads)


ops.conv_transpose3d_epilogue.register_autograd(_backward, setup_context=_setup_context)
