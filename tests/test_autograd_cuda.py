"""Autograd of the fused op and training of optimized models on a CUDA GPU.

- Op level: gradients of input, weight, bias and every extra that requires grad, for every
  opcode case of ``test_autograd.py``, against eager PyTorch (float32 under the default TF32
  policy: error vs a float64 reference at most twice eager's; float64: equal to the CPU float64
  reference), for several requires_grad patterns (the backward's stand-in paths) and a 0-d CPU
  scalar extra; opcheck on CUDA; torch.compile(fullgraph=True, inductor) with no graph break.
- Model level: a small 3-D U-Net optimized with ``ct3d_fx.optimize`` trains for 20 steps like
  the eager model (losses match), through an optimizer built on the original model's parameters;
  train()/eval() switching; the compiled optimized model.

Skipped without CUDA.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import ct3d_fx  # noqa: F401  (registers torch.ops.ct3d.*)
from ct3d_fx import ops
from ct3d_fx.ops import Opcode

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _load_cpu_tests():
    """The CPU test module (cases and helpers are shared), loaded by path."""
    path = Path(__file__).with_name("test_autograd.py")
    spec = importlib.util.spec_from_file_location("_ct3d_test_autograd_cases", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


T = _load_cpu_tests()
OP, F64, C = T.OP, T.F64, T.C
DEV = "cuda"

# GPU geometry: x (2, 8, 5, 6, 7), weight (8, C, 3, 3, 3), stride 2, padding 1,
# output_padding 1 -> y (2, C, 10, 12, 14). Large enough for several thread blocks.
X_SHAPE, W_SHAPE = (2, 8, 5, 6, 7), (8, C, 3, 3, 3)
GEOMETRY = dict(stride=[2, 2, 2], padding=[1, 1, 1], output_padding=[1, 1, 1],
                dilation=[1, 1, 1], groups=1)
Y_SHAPE = (2, C, 10, 12, 14)

MODES = ["all", "conv_only", "extras_only", "input_only", "weight_only"]


def _extra_shape(shape):
    """Map the CPU cases' extras shapes onto the GPU geometry's output."""
    if shape == T.Y_SHAPE:
        return Y_SHAPE
    if shape == (3,):  # last-dim broadcast
        return (Y_SHAPE[-1],)
    return shape


def _gpu_program(program):
    """The CPU cases' program with each LAYER_NORM's size (field e: the CPU output's last
    dimension) set to the GPU geometry's W_out, as its weight and bias are (_extra_shape)."""
    out = list(program)
    for i in range(0, len(out), ops.INSTR_WIDTH):
        if out[i] == Opcode.LAYER_NORM and out[i + 5] == T.Y_SHAPE[-1]:
            out[i + 5] = Y_SHAPE[-1]
    return out


def _inputs(case, mode, dtype, seed, channels_last=False, cpu_scalar=False):
    """(x, w, b, leaves, layout) on the GPU in ``dtype`` with requires_grad set by ``mode``.

    ``leaves`` are the unique extras; ``layout[i]`` indexes the leaf of extras[i]. BatchNorm
    running statistics never require grad. With ``cpu_scalar`` 0-d extras stay on the CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    x, w, b = T.conv_inputs(gen, X_SHAPE, W_SHAPE)
    case = T.dataclasses.replace(case, program=_gpu_program(case.program), extras=tuple(
        T.dataclasses.replace(e, shape=_extra_shape(e.shape)) for e in case.extras))
    leaves, layout = T.make_extras(case, gen)
    x = x.to(DEV, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    w, b = w.to(DEV, dtype), b.to(DEV, dtype)
    leaves = [t.to(dtype) if (cpu_scalar and t.dim() == 0) else t.to(DEV, dtype) for t in leaves]
    uniq = [e for e in case.extras if e.same is None]
    x.requires_grad_(mode in ("all", "conv_only", "input_only"))
    w.requires_grad_(mode in ("all", "conv_only", "weight_only"))
    b.requires_grad_(mode in ("all", "conv_only"))
    for t, e in zip(leaves, uniq):
        t.requires_grad_(e.grad and mode in ("all", "extras_only"))
    return case, x, w, b, leaves, layout


def _call(case, layout, x, w, b, leaves):
    g = GEOMETRY
    return OP(x, w, b, g["stride"], g["padding"], g["output_padding"], g["dilation"], g["groups"],
              case.program, case.scalars, [leaves[i] for i in layout])


def _grads(out, weights, wrt):
    return torch.autograd.grad((out * weights.to(out.dtype)).sum(), wrt)


def _param_cases():
    out = []
    for c in T.CASES:
        has_extra_grad = any(e.grad for e in c.extras if e.same is None)
        for m in MODES:
            if m == "extras_only" and not has_extra_grad:
                continue
            out.append(pytest.param(c, m, id=f"{c.name}-{m}"))
    return out


def _bias_terms_abs(case, layout, ref_in, r):
    """(max over channels of sum |dL/dy| over (N, D, H, W), the number of terms per channel), in
    float64 on the CPU: the magnitude of the terms the conv bias gradient sums."""
    x, w, b, *leaves = (t.detach() for t in ref_in)
    g = GEOMETRY
    y = F.conv_transpose3d(x, w, b, g["stride"], g["padding"], g["output_padding"], g["groups"],
                           g["dilation"]).requires_grad_()
    out = T._run_program(y, case.program, case.scalars, [leaves[i] for i in layout])
    (dy,) = torch.autograd.grad((out * r.to(out.dtype)).sum(), y)
    return dy.abs().sum(dim=(0, 2, 3, 4)).max().item(), dy.numel() // dy.size(1)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case,mode", _param_cases())
def test_grads_match_eager(case, mode, dtype):
    seed = zlib.crc32(f"{case.name}-{mode}".encode())
    case, x, w, b, leaves, layout = _inputs(case, mode, dtype, seed)
    inputs = [x, w, b, *leaves]
    wrt = [t for t in inputs if t.requires_grad]
    out = _call(case, layout, *inputs[:3], inputs[3:])
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    got = _grads(out, r.to(DEV), wrt)

    # float64 reference: eager autograd through F.conv_transpose3d + the interpreter, on the CPU.
    ref_in = [t.detach().cpu().double().requires_grad_(t.requires_grad) for t in inputs]
    ref_out = T._reference(case, layout, *ref_in, geometry=GEOMETRY)
    ref = _grads(ref_out, r, [t for t in ref_in if t.requires_grad])
    if dtype == F64:
        for g, want in zip(got, ref):
            torch.testing.assert_close(g.cpu(), want, rtol=1e-9, atol=1e-10)
        return
    # float32: eager PyTorch on the GPU under the default TF32 policy is the accuracy bar.
    eag_in = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    eag_out = T._reference(case, layout, *eag_in, geometry=GEOMETRY)
    eag = _grads(eag_out, r.to(DEV), [t for t in eag_in if t.requires_grad])
    eps = torch.finfo(torch.float32).eps
    bias_i = next((k for k, t in enumerate(wrt) if t is b), None)
    for i, (g, e, want) in enumerate(zip(got, eag, ref)):
        assert g.shape == want.shape and g.dtype == e.dtype and g.device == e.device
        scale = want.abs().max().item()
        err = (g.double().cpu() - want).abs().max().item()
        err_eager = (e.double().cpu() - want).abs().max().item()
        floor = 8 * eps * max(scale, 1.0)
        if i == bias_i:
            # the bias gradient sums n terms dL/dy over (N, D, H, W); where they cancel (after
            # a LayerNorm over W it is exactly 0) float32 rounding scales with their
            # magnitudes: a random walk of n roundings, sqrt(n) * eps * (sum |dL/dy|) / n
            total, n = _bias_terms_abs(case, layout, ref_in, r)
            floor += 8 * eps * total / n ** 0.5
        assert err <= 2 * err_eager + floor, \
            f"grad {i}: error {err:.3g} vs float64 > 2 x eager's {err_eager:.3g} + {floor:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_channels_last_input_and_cpu_scalar_extra(dtype):
    """channels_last_3d input; a 0-d CPU extra that requires grad gets its gradient on the CPU."""
    case = next(c for c in T.CASES if c.name == "load_tensor_0d_mul")
    case, x, w, b, leaves, layout = _inputs(case, "all", dtype, 53, channels_last=True,
                                            cpu_scalar=True)
    assert leaves[0].device.type == "cpu" and leaves[0].dim() == 0
    inputs = [x, w, b, *leaves]
    out = _call(case, layout, x, w, b, leaves)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(54), dtype=F64)
    got = _grads(out, r.to(DEV), inputs)
    assert got[3].device.type == "cpu" and got[3].shape == ()
    ref_in = [t.detach().cpu().double().requires_grad_() for t in inputs]
    ref = _grads(T._reference(case, layout, *ref_in, geometry=GEOMETRY), r, ref_in)
    rtol = 1e-9 if dtype == F64 else 1e-2  # float32: TF32 convolutions by default
    for g, want in zip(got, ref):
        torch.testing.assert_close(g.cpu().double(), want, rtol=rtol,
                                   atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("sample", list(T.OPCHECK_SAMPLES))
def test_opcheck_cuda(sample, requires_grad):
    case, geometry = T.OPCHECK_SAMPLES[sample]
    g = dict(T.GEOMETRY_DEFAULT, **geometry)
    gen = torch.Generator().manual_seed(59)
    x, w, b = (t.to(DEV, torch.float32) for t in T.conv_inputs(gen))
    leaves, layout = T.make_extras(case, gen)
    leaves = [t.to(DEV, torch.float32) for t in leaves]
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    uniq = [e for e in case.extras if e.same is None]
    for t, e in zip(leaves, uniq):
        t.requires_grad_(requires_grad and e.grad)
    args = (x, w, b, g["stride"], g["padding"], g["output_padding"], g["dilation"], g["groups"],
            case.program, case.scalars, [leaves[i] for i in layout])
    torch.library.opcheck(OP.default, args)


def test_compile_fullgraph_inductor_cuda():
    """An op-calling module compiled with inductor: no graph break; grads equal eager's."""
    eager, mod = T._Decoder().to(DEV, torch.float32), T._Decoder().to(DEV, torch.float32)
    x = torch.randn(2, 2, 5, 6, 7, device=DEV)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(mod, fullgraph=True)
    compiled(x).square().mean().backward()
    eager(x).square().mean().backward()
    assert dict(counters["graph_break"]) == {}
    for (name, p), q in zip(eager.named_parameters(), mod.parameters()):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                   msg=lambda m: f"{name}.grad: {m}")


# ---------------------------------------------------------------------------------------------
# Model level.

def _batch(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 16, 16, 16, generator=gen, dtype=F64)
    target = torch.randn(2, 3, 16, 16, 16, generator=gen, dtype=F64)
    return x.to(DEV, dtype), target.to(DEV, dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-3), (F64, 1e-9)], ids=["f32", "f64"])
def test_unet_20_steps_match_eager_with_original_parameters(dtype, rtol):
    """20 Adam steps; the optimizer holds the ORIGINAL model's parameters. float32 losses
    within 2e-3 relative (TF32 convolutions by default), float64 within 1e-9."""
    x, target = _batch(61, dtype)
    model = T.make_unet(dtype=dtype, device=DEV)
    eager = copy.deepcopy(model)
    optimized = ct3d_fx.optimize(model, (x,))
    assert T.fused_sites(optimized) == ["up", "up2"], str(optimized.ct3d_report)
    with T.FusedOpCounter() as count:
        F.mse_loss(optimized(x), target).backward()
    assert count.calls == 4, "2 sites x (forward + recompute in backward)"
    assert all(p.grad is not None for p in model.parameters())
    for p in model.parameters():
        p.grad = None
    losses_e, losses_o = T.train_side_by_side(eager, optimized, list(eager.parameters()),
                                              list(model.parameters()), x, target, steps=20)
    torch.testing.assert_close(losses_o, losses_e, rtol=rtol, atol=0)
    assert losses_o[-1] < 0.95 * losses_o[0], losses_o
    with torch.no_grad():  # shared parameters: the original module is the trained one
        out_o, out_m = optimized(x), model(x)
    torch.testing.assert_close(out_o, out_m, rtol=100 * rtol, atol=100 * rtol)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_unet_train_eval_switching(dtype):
    """The BatchNorm site runs unfused in train() (batch statistics, running stats updated like
    eager's) and fused in eval(); outputs and grads match eager in every mode."""
    x, _ = _batch(67, dtype)
    model = T.make_unet(norm=True, dtype=dtype, device=DEV).eval()
    eager = copy.deepcopy(model)
    optimized = ct3d_fx.optimize(model, (x,))
    assert T.fused_sites(optimized) == ["up", "up2"], str(optimized.ct3d_report)
    tol = 1e-9 if dtype == F64 else 2e-3
    for mode in ("train", "eval", "train", "eval"):
        getattr(optimized, mode)()
        getattr(eager, mode)()
        with T.FusedOpCounter() as count:
            out_o = optimized(x)
        out_e = eager(x)
        assert count.calls == (1 if mode == "train" else 2), mode
        scale = out_e.abs().max().item()
        torch.testing.assert_close(out_o, out_e, rtol=tol, atol=tol * scale)
        go = torch.autograd.grad(out_o.square().mean(), list(model.parameters()))
        ge = torch.autograd.grad(out_e.square().mean(), list(eager.parameters()))
        # A bias before a training-mode BatchNorm has an analytically zero gradient (rounding
        # noise around 1e-17): scale atol by the largest gradient of the model, not of the bias.
        gscale = max(g.abs().max().item() for g in ge)
        for (name, _), a, b in zip(eager.named_parameters(), go, ge):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * gscale,
                                       msg=lambda m: f"{mode} {name}.grad: {m}")
        for name, buf in eager.named_buffers():
            torch.testing.assert_close(model.get_buffer(name), buf, rtol=tol, atol=tol,
                                       msg=lambda m: f"{mode} buffer {name}: {m}")


def test_compile_optimized_unet_fullgraph_cuda():
    """torch.compile(optimize(model), fullgraph=True) with inductor: no graph break; one
    training step's grads match the eager model's (float32, TF32 policy)."""
    x, target = _batch(71, torch.float32)
    model = T.make_unet(norm=True, device=DEV, dtype=torch.float32).eval()
    eager = copy.deepcopy(model)
    optimized = ct3d_fx.optimize(model, (x,))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(optimized, fullgraph=True)
    F.mse_loss(compiled(x), target).backward()
    F.mse_loss(eager(x), target).backward()
    assert dict(counters["graph_break"]) == {}
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=2e-3, atol=2e-3 * max(scale, 1e-6),
                                   msg=lambda m: f"{name}.grad: {m}")
