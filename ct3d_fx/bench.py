"""The benchmark runner: ``python -m ct3d_fx.bench``.

For every problem of the suite (``benchmarks/suite.json``: the KernelBench ConvTranspose3d
problems restated as data) and for two whole networks (``examples/unet_decoder.py`` and
``examples/gan_generator.py``), the runner builds the model, checks the optimized model's
results and times four things in one process, so that their ratios can be compared:

* ``eager_ms``: the model in PyTorch eager mode;
* ``compile_ms``: ``torch.compile(model)`` (default mode);
* ``ct3d_ms``: ``ct3d_fx.optimize(model)``;
* ``fused_op_ms`` against ``eager_conv_epilogue_ms``: every call of the fused op
  ``torch.ops.ct3d.conv_transpose3d_epilogue`` that the optimized model makes, alone, against
  the same calls of :func:`ct3d_fx.ops.reference`, which runs ``F.conv_transpose3d`` and then the
  replaced ops one PyTorch call at a time, i.e. what eager mode runs for the fused chains.

The arguments of the fused calls are captured during one forward of the optimized model with a
``TorchDispatchMode`` (so calls made anywhere in the module tree are seen), then replayed.

The floor of a problem is ``max(conv FLOPs / matmul rate, conv bytes / copy bandwidth)``, with
both ceilings measured on the device at the start of the run (see :func:`measure_ceilings`),
conv FLOPs ``2 * N * C_in * D * H * W * (C_out / groups) * kD * kH * kW`` (input spatial size) and
conv bytes the input, weight and output of each ConvTranspose3d. ``floor_ratio`` is
``fused_op_ms / floor_ms``: 1.0 would be a kernel at the speed of light.

Correctness in the same run: ``max_rel_err_vs_eager`` and ``max_rel_err_vs_fp64`` compare the
optimized model's output with eager's and with a float64 copy of the model
(``copy.deepcopy(model).double()`` on the same inputs, promoted to float64). Errors are
normwise: ``max |out - ref| / max |ref|`` (see :func:`max_rel_err`). Eager's and torch.compile's
own errors against float64 are recorded next to them as the bar to compare with.

Timing: ``triton.testing.do_bench(..., return_mode="median")`` when triton imports, otherwise a
loop of CUDA events with the same structure (warm-up, a 256 MiB buffer zeroed before every run
to flush the L2 cache, the median of the runs). On the CPU a ``time.perf_counter`` loop; CPU
times only show that the runner works. Since v29 the whole models of a row (eager, compile,
ct3d, ct3d_compile) are timed together by :func:`time_interleaved` instead: ``--rounds``
rounds (default 5), in each of which every model runs about ``rep_ms / rounds`` of calls, each
call between CUDA events with the L2 flushed before it (the event loop, not do_bench), the
order rotated per round. Their ``*_ms`` are the medians of the round medians (the round medians
are in the row's ``model_round_ms``) and their speedups the medians of the rounds' ratios
(:func:`paired_ratio`): small models are bound by the host's launch time, the host's speed
drifts during a run, and models timed at different moments would carry that drift into their
ratio. ``--rounds 1`` times them one after another with :func:`time_ms` as before.

Run ``python -m ct3d_fx.bench --help`` for the options; ``benchmarks/README.md`` shows how to
split a full run into parts of under 10 minutes and merge them.

Limitations:
    - CPU runs time the reference path; they only show that the runner works.
    - The floor counts the convolutions of the fused calls only: extra tensors an epilogue
      reads (a residual input, BatchNorm statistics) and ops outside the fused chains are not
      in it, so ``floor_ratio`` is about the fused op, not the whole model.
    - ``optimize`` runs on a deep copy of the model with its own verification off (the runner
      measures the errors and reports them instead of stopping).
    - Rows of a ``--merge``'d file may come from different runs: compare ratios within a row.
    - The suite file and the example networks are read from the repository (``benchmarks/``,
      ``examples/``); an installed package without them needs ``--suite`` and
      ``--networks none``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import math
import operator
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SuiteModel", "load_suite", "build_problem", "problem_shapes", "randomize_batchnorm",
           "max_rel_err", "conv_cost", "time_ms", "time_interleaved", "paired_ratio",
           "measure_ceilings", "run", "main", "ROW_KEYS", "TINY_SCALE"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SUITE = REPO_ROOT / "benchmarks" / "suite.json"
EXAMPLES_DIR = REPO_ROOT / "examples"

#: ``--tiny`` (and the default of ``--device cpu``) shrinks batch and spatial sizes by this factor.
TINY_SCALE = 0.125
#: Scaled spatial sizes never go below this (every suite problem's pooling still fits).
MIN_SPATIAL = 4
NETWORKS = ("unet_decoder", "gan_generator")
DEFAULT_BATCHES = (1, 2, 4, 8)
DTYPES = {"fp32": torch.float32, "fp32-exact": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
FLUSH_BYTES = 256 << 20

#: The keys every JSON row has (values may be null when a stage failed or was skipped).
#: ``--merge`` fills the keys an older file's rows lack (``model_round_ms`` before v29) with null.
ROW_KEYS = ("id", "kind", "eager_ms", "compile_ms", "ct3d_ms", "fused_op_ms",
            "eager_conv_epilogue_ms", "floor_ms", "floor_ratio", "max_rel_err_vs_eager",
            "max_rel_err_vs_fp64", "fused", "model_round_ms")

# ------------------------------------------------------------------------------------------
# Building the suite's models
# ------------------------------------------------------------------------------------------

ABOUT = ("ct3d_fx benchmark (python -m ct3d_fx.bench). Times in ms: median of runs with the L2 "
         "cache flushed (see 'timer'). Since v29 the whole models (eager_ms, compile_ms, "
         "ct3d_ms, ct3d_compile_ms) are timed in 'rounds' interleaved rounds, the order "
         "rotated per round: each is the median of its round medians (model_round_ms: the "
         "round medians, ms), and speedup_vs_eager, speedup_vs_compile and "
         "ct3d_compile_speedup_vs_compile are the median of the rounds' ratios, so that a "
         "drift of the machine's speed during the row cancels; rounds 1: one timing per model "
         "in turn, ratios of the medians (as before v29). op_speedup is the ratio of the "
         "medians. eager_ms: the model in eager mode; compile_ms: "
         "torch.compile(model), default mode (compile_s: its first call, compilation included, "
         "in s); ct3d_ms: ct3d_fx.optimize(model); fused_op_ms: the fused op calls alone; "
         "eager_conv_epilogue_ms: the same calls run as F.conv_transpose3d plus the replaced "
         "ops one by one (ct3d_fx.ops.reference). floor_ms = max(conv FLOPs / "
         "ceilings.floor_tflops, conv bytes / ceilings.copy_TBps), conv bytes = input + weight "
         "+ output; floor_ratio = fused_op_ms / floor_ms. Errors: max |out - ref| / max |ref| "
         "against eager (max_rel_err_vs_eager) and a float64 copy of the model "
         "(max_rel_err_vs_fp64; eager_ and compile_max_rel_err_vs_fp64 are PyTorch's own). "
         "fused: the fused chains; sites: the rewrite report; autotune: the implementation "
         "the per-shape autotune chose for each fused call (fused, reference, "
         "cudnn_channels_last, cudnn_channels_last_pass, cudnn_pass, subpixel) and "
         "autotune_ms each decision's candidate medians (ms per call, the autotune's own "
         "timer: CUDA events around bursts of calls, no L2 flush); tail_autotune: the "
         "decisions of the kernels after a site (norm_tail, pool_tail: kernel or reference, "
         "with their medians) made while ct3d_ms was timed, and tail_kernel_ran: whether "
         "each tail's last timed call ran its kernel (true) or PyTorch's ops (false; absent: "
         "the call went to PyTorch's ops before the kernel's checks; with rounds > 1 the "
         "call of one more forward of the optimized model after the timings); errors: "
         "{stage: message} of "
         "failed stages. Inputs uniform in [0, 1), eval mode, random BatchNorm statistics. "
         "Compare ratios measured in one run; absolute times vary between machines.")

_BINARY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
           "div": operator.truediv}
_ACTIVATIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
                "hardswish": F.hardswish, "gelu": F.gelu}
_MODULE_OPS = ("batch_norm", "group_norm", "layer_norm", "avg_pool", "max_pool",
               "adaptive_avg_pool")
_OTHER_OPS = ("clamp", "leaky_relu", "swish", "x_mul_hardswish", "hardswish_manual", "softmax",
              "softmax_spatial", "logsumexp", "mean", "sum", "max", "sub_mean")
#: Every op name the suite's "pre" and "post" lists may use.
KNOWN_OPS = frozenset(_BINARY) | frozenset(_ACTIVATIONS) | frozenset(_MODULE_OPS) \
    | frozenset(_OTHER_OPS)


def _tuple3(v) -> Tuple[int, int, int]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v, v)


def _dims(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def load_suite(path: os.PathLike | str = DEFAULT_SUITE) -> dict:
    """Read a suite file and check that every problem uses only known ops.

    Returns:
        The parsed JSON (``{"about", "ops", "problems": [...]}``).

    Raises:
        FileNotFoundError: no file at ``path`` (pass ``--suite`` when the package is installed
            without the repository's ``benchmarks/`` folder).
        ValueError: a problem without ``id``/``ct``/``x``, or an op outside :data:`KNOWN_OPS`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ct3d bench: suite file {path} not found; pass --suite PATH "
                                f"(the repository has it at benchmarks/suite.json)")
    suite = json.loads(path.read_text())
    for i, p in enumerate(suite.get("problems", [])):
        for key in ("id", "ct", "x"):
            if key not in p:
                raise ValueError(f"ct3d bench: {path}: problem {i} has no {key!r}")
        for where in ("pre", "post"):
            for j, spec in enumerate(p.get(where, [])):
                if spec.get("op") not in KNOWN_OPS:
                    raise ValueError(f"ct3d bench: problem {p['id']}: {where}[{j}] has unknown op "
                                     f"{spec.get('op')!r}; known: {sorted(KNOWN_OPS)}")
    return suite


class SuiteModel(nn.Module):
    """One suite problem as an ``nn.Module``: optional ops, ConvTranspose3d, ops after it.

    ``forward(x, input1=None)``: ``x`` is (N, C_in, D, H, W); ``input1`` is the second input of
    problems that list one (``"other": "input1"``), otherwise unused. Any float dtype the
    parameters have; NCDHW. The module names are readable in rewrite reports:
    ``conv_transpose``, ``post1_batch_norm``, ``post0_add_param`` and so on.

    The op vocabulary is the suite file's ``"ops"`` section; two names it uses without listing
    them are read as KernelBench does: ``sub_mean`` is ``x - x.mean(dim, keepdim=True)`` and
    ``max`` is ``torch.max(x, dim, keepdim).values``. ``"conv_out"`` is the ConvTranspose3d
    output, detached (``x.detach()``).

    Raises:
        ValueError: an unknown op or operand (naming the problem and the list position).

    Limitations:
        Parameters are created on the CPU in float32; move and cast the module as usual. The
        forward is traceable by ``torch.fx.symbolic_trace`` (the loop over the ops unrolls).
    """

    def __init__(self, entry: dict):
        super().__init__()
        self.problem_id = entry.get("id", "?")
        ct = entry["ct"]
        self.conv_transpose = nn.ConvTranspose3d(
            ct["in"], ct["out"], _tuple3(ct["k"]), stride=_tuple3(ct.get("stride", 1)),
            padding=_tuple3(ct.get("padding", 0)),
            output_padding=_tuple3(ct.get("output_padding", 0)), groups=ct.get("groups", 1),
            bias=ct.get("bias", True), dilation=_tuple3(ct.get("dilation", 1)))
        self._pre = self._make_steps("pre", entry.get("pre", []), ct["in"])
        self._post = self._make_steps("post", entry.get("post", []), ct["out"])
        if any(s[2] == ("conv_out",) for s in self._pre):
            raise ValueError(f"ct3d bench: problem {self.problem_id}: 'conv_out' cannot be used "
                             f"before the convolution")
        self._uses_conv_out = any(s[2] == ("conv_out",) for s in self._post)

    def _make_steps(self, where: str, specs: Sequence[dict], channels: int) -> list:
        steps = []
        for i, spec in enumerate(specs):
            op = spec.get("op")
            name = f"{where}{i}_{op}"
            attr, other = None, None
            if op in _BINARY:
                o = spec.get("other")
                if isinstance(o, (int, float)) and not isinstance(o, bool):
                    other = ("const", float(o))
                elif o in ("input1", "conv_out"):
                    other = (o,)
                elif isinstance(o, dict) and "param" in o:
                    attr = f"{name}_param"
                    self.register_parameter(attr, nn.Parameter(_init_param(o, self.problem_id)))
                    other = ("param",)
                else:
                    raise ValueError(f"ct3d bench: problem {self.problem_id}: {where}[{i}] "
                                     f"({op}) has an unknown operand {o!r}")
            elif op in _MODULE_OPS:
                attr = name
                self.add_module(attr, _make_module(op, spec, channels))
            elif op not in KNOWN_OPS:
                raise ValueError(f"ct3d bench: problem {self.problem_id}: {where}[{i}] has unknown "
                                 f"op {op!r}; known: {sorted(KNOWN_OPS)}")
            if op in ("logsumexp", "sum", "mean", "max") and spec.get("dim") == 1:
                channels = 1
            steps.append((op, attr, other, dict(spec)))
        return steps

    def forward(self, x, input1=None):
        for step in self._pre:
            x = self._run_step(step, x, None, input1)
        x = self.conv_transpose(x)
        conv_out = x.detach() if self._uses_conv_out else None
        for step in self._post:
            x = self._run_step(step, x, conv_out, input1)
        return x

    def _run_step(self, step, x, conv_out, input1):
        op, attr, other, spec = step
        if op in _BINARY:
            kind = other[0]
            if kind == "const":
                y = other[1]
            elif kind == "param":
                y = getattr(self, attr)
            elif kind == "input1":
                y = input1
            else:
                y = conv_out
            return _BINARY[op](x, y)
        if attr is not None:
            return getattr(self, attr)(x)
        if op in _ACTIVATIONS:
            return _ACTIVATIONS[op](x)
        if op == "clamp":
            return torch.clamp(x, min=spec.get("min"), max=spec.get("max"))
        if op == "leaky_relu":
            return F.leaky_relu(x, spec.get("negative_slope", 0.01))
        if op == "swish":
            return x * torch.sigmoid(x)
        if op == "x_mul_hardswish":
            return x * F.hardswish(x)
        if op == "hardswish_manual":
            return x * torch.sigmoid(x + 3) / 6
        if op == "softmax":
            return torch.softmax(x, dim=spec["dim"])
        if op == "softmax_spatial":
            shape = x.shape
            y = torch.softmax(x.view(shape[0], shape[1], -1), dim=2)
            return y.view(shape)
        if op == "logsumexp":
            return torch.logsumexp(x, dim=_dims(spec["dim"]), keepdim=spec.get("keepdim", False))
        if op == "mean":
            return torch.mean(x, dim=_dims(spec["dim"]), keepdim=spec.get("keepdim", False))
        if op == "sum":
            return torch.sum(x, dim=_dims(spec["dim"]), keepdim=spec.get("keepdim", False))
        if op == "max":
            return torch.max(x, dim=spec["dim"], keepdim=spec.get("keepdim", False))[0]
        if op == "sub_mean":
            return x - torch.mean(x, dim=_dims(spec["dim"]), keepdim=True)
        raise AssertionError(op)  # _make_steps rejects unknown ops

    def extra_repr(self) -> str:
        return f"problem={self.problem_id!r}"


def _init_param(spec: dict, problem_id: str) -> torch.Tensor:
    shape = tuple(spec["param"])
    init = spec.get("init", "randn")
    if init == "randn":
        return torch.randn(shape)
    if init == "ones":
        return torch.ones(shape)
    if init == "value":
        return torch.full(shape, float(spec["value"]))
    raise ValueError(f"ct3d bench: problem {problem_id}: unknown param init {init!r} "
                     f"(expected 'randn', 'ones' or 'value')")


def _make_module(op: str, spec: dict, channels: int) -> nn.Module:
    if op == "batch_norm":
        return nn.BatchNorm3d(channels, eps=spec.get("eps", 1e-5),
                              momentum=spec.get("momentum", 0.1))
    if op == "group_norm":
        return nn.GroupNorm(spec["groups"], channels, eps=spec.get("eps", 1e-5))
    if op == "layer_norm":
        return nn.LayerNorm(tuple(spec["normalized_shape"]), eps=spec.get("eps", 1e-5))
    if op in ("avg_pool", "max_pool"):
        cls = nn.AvgPool3d if op == "avg_pool" else nn.MaxPool3d
        return cls(spec["kernel"], stride=spec.get("stride"), padding=spec.get("padding", 0))
    if op == "adaptive_avg_pool":
        return nn.AdaptiveAvgPool3d(tuple(spec["output_size"]))
    raise AssertionError(op)


def randomize_batchnorm(model: nn.Module, generator: Optional[torch.Generator] = None) -> int:
    """Give every BatchNorm layer of ``model`` random running statistics and affine parameters.

    Running mean ``randn * 0.1``, running variance uniform in [0.5, 1.5), weight uniform in
    [0.5, 1.5), bias ``randn * 0.1`` (when affine), drawn on the CPU from ``generator`` (or the
    global generator) and copied in place, so the model's device and dtype are kept.

    Returns:
        The number of BatchNorm layers changed.
    """
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)
            n += 1
    return n


def _meta_trunk_shape(model: SuiteModel, x_shape: Sequence[int]) -> Tuple[int, ...]:
    """Shape of the ConvTranspose3d output for input ``x_shape`` (pre ops included)."""
    x = torch.empty(tuple(x_shape), device="meta")
    for op, attr, _, _ in model._pre:
        if attr is None:
            raise ValueError(f"ct3d bench: problem {model.problem_id}: cannot size op {op!r} "
                             f"before the convolution")
        x = getattr(model, attr)(x)
    c = model.conv_transpose
    w = torch.empty(c.weight.shape, device="meta")
    y = F.conv_transpose3d(x, w, None, c.stride, c.padding, c.output_padding, c.groups,
                           c.dilation)
    return tuple(y.shape)


def problem_shapes(entry: dict, scale: float = 1.0,
                   model: Optional[SuiteModel] = None) -> List[Tuple[int, ...]]:
    """Input shapes of a suite problem, shrunk by ``scale`` (1.0 = the published sizes).

    Batch becomes ``max(1, round(N * scale))`` and each spatial size
    ``max(MIN_SPATIAL, round(d * scale))``, except the trailing dims a ``layer_norm`` normalises
    (their size is fixed by ``normalized_shape``). ``input1`` follows the scaled convolution
    output where its full-size dims equal the full-size convolution output.

    Returns:
        ``[x_shape]`` or ``[x_shape, input1_shape]``.

    Raises:
        ValueError: ``scale`` not in (0, 1].
    """
    if not 0 < scale <= 1:
        raise ValueError(f"ct3d bench: scale must be in (0, 1], got {scale}")
    full_x = tuple(entry["x"])
    if scale == 1:
        x = full_x
    else:
        keep = 0
        for spec in entry.get("post", []):
            if spec["op"] == "layer_norm":
                keep = max(keep, len(spec["normalized_shape"]))
        x = [max(1, round(full_x[0] * scale)), full_x[1]]
        for i, d in enumerate(full_x[2:]):
            fixed = i >= len(full_x) - 2 - keep
            x.append(d if fixed else max(MIN_SPATIAL, round(d * scale)))
        x = tuple(x)
    shapes = [x]
    if "input1" in entry:
        full_in1 = tuple(entry["input1"])
        if scale == 1:
            shapes.append(full_in1)
        else:
            model = model if model is not None else SuiteModel(entry)
            full_out = _meta_trunk_shape(model, full_x)
            out = _meta_trunk_shape(model, x)
            if len(full_in1) != len(full_out):
                raise ValueError(f"ct3d bench: problem {entry['id']}: input1 {full_in1} and the "
                                 f"convolution output {full_out} differ in rank")
            shapes.append(tuple(o if f == fo else f
                                for f, fo, o in zip(full_in1, full_out, out)))
    return shapes


def build_problem(entry: dict, scale: float = 1.0,
                  seed: Optional[int] = None) -> Tuple[SuiteModel, List[Tuple[int, ...]]]:
    """Build a suite problem: the model (eval mode, CPU, float32) and its input shapes.

    Args:
        entry: one element of the suite's ``"problems"``.
        scale: shrink factor for batch and spatial sizes, in (0, 1] (see :func:`problem_shapes`).
        seed: when given, ``torch.manual_seed(seed)`` first, so parameters are reproducible.

    Returns:
        ``(model, shapes)``; draw the inputs uniform in [0, 1) with these shapes. BatchNorm
        statistics and affine parameters are already randomised (:func:`randomize_batchnorm`).
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = SuiteModel(entry).eval()
    randomize_batchnorm(model)
    return model, problem_shapes(entry, scale, model)


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------

def max_rel_err(out, ref) -> float:
    """Normwise maximum relative error ``max |out - ref| / max |ref|``, computed in float64.

    ``out`` and ``ref`` are tensors (or equal-length tuples/lists of tensors, the maximum is
    taken over all) of the same shape, any float dtype and device. A ``ref`` of all zeros gives
    the absolute error. NaN or inf anywhere gives ``nan``/``inf``.

    Raises:
        ValueError: the shapes (or tuple lengths) differ.
    """
    outs, refs = _flat(out), _flat(ref)
    if len(outs) != len(refs):
        raise ValueError(f"ct3d bench: output has {len(outs)} tensors, reference {len(refs)}")
    worst = 0.0
    for a, b in zip(outs, refs):
        if a.shape != b.shape:
            raise ValueError(f"ct3d bench: output shape {tuple(a.shape)} differs from reference "
                             f"shape {tuple(b.shape)}")
        a64 = a.detach().to(torch.float64)
        b64 = b.detach().to(a64.device, torch.float64)
        if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
            return float("nan")
        denom = b64.abs().max().item() if b64.numel() else 0.0
        err = (a64 - b64).abs().max().item() if b64.numel() else 0.0
        worst = max(worst, err / denom if denom > 0 else err)
    return worst


def check_optimized(model: nn.Module, inputs: Sequence[torch.Tensor]) -> bool:
    """Optimize ``model``, print the report and the errors; True when the result is accurate.

    Accurate: the optimized model's max relative error against a float64 copy of the model is
    at most twice eager's own error plus 1e-6 (errors are max |out - ref| / max |ref|). Used by
    the example networks in examples/.
    """
    import ct3d_fx

    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = model(*inputs)
        opt = ct3d_fx.optimize(model, tuple(inputs))
        got = opt(*inputs)
        exact = ref64(*[t.double() for t in inputs])
    print(opt.ct3d_report)
    err_eager = max_rel_err(got, expected)
    err_opt, err_ref = max_rel_err(got, exact), max_rel_err(expected, exact)
    print(f"max relative error: optimized vs eager {err_eager:.2e}; vs float64: optimized "
          f"{err_opt:.2e}, eager {err_ref:.2e}")
    return err_opt <= 2 * err_ref + 1e-6


def example_main(build: Callable, description: str, argv=None) -> int:
    """Command line of an example network: ``build(batch, tiny)`` -> (model, input shapes)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small sizes (the default on the CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, shapes = build(args.batch, tiny=args.tiny or device.type == "cpu")
    model = model.to(device)
    inputs = [torch.rand(s, device=device) for s in shapes]
    ok = check_optimized(model, inputs)
    print("OK" if ok else "FAILED: the optimized model is less accurate than eager allows")
    return 0 if ok else 1


def _flat(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flat(item)]
    raise TypeError(f"ct3d bench: expected a tensor or a tuple of tensors, got {type(x).__name__}")


def conv_cost(input_shape: Sequence[int], weight_shape: Sequence[int],
              output_shape: Sequence[int], groups: int, elem_bytes: int) -> Tuple[float, float]:
    """FLOPs and bytes of one ConvTranspose3d.

    Args:
        input_shape: (N, C_in, D, H, W). weight_shape: (C_in, C_out/groups, kD, kH, kW).
        output_shape: (N, C_out, D_out, H_out, W_out). groups: int. elem_bytes: bytes/element.

    Returns:
        ``(flops, bytes)``: ``2 * N * C_in * D*H*W * (C_out/groups) * kD*kH*kW`` and
        ``(input + weight + output elements) * elem_bytes``.
    """
    n, c_in = input_shape[0], input_shape[1]
    spatial = math.prod(input_shape[2:])
    c_out_g, kvol = weight_shape[1], math.prod(weight_shape[2:])
    flops = 2.0 * n * c_in * spatial * c_out_g * kvol
    nbytes = (math.prod(input_shape) + math.prod(weight_shape) + math.prod(output_shape)) \
        * elem_bytes
    return flops, float(nbytes)


try:  # triton's do_bench is the usual timer on CUDA; the event loop below is the fallback
    import triton.testing as _triton_testing
except Exception:  # noqa: BLE001  (ImportError, or a triton that fails to initialise)
    _triton_testing = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0,
            rep_ms: float = 100.0) -> float:
    """Median time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, warmup_ms, rep_ms, return_mode="median")`` when triton
    imports; otherwise CUDA events around each run, ``warmup_ms`` of warm-up runs, about
    ``rep_ms`` of timed runs (at least 5, at most 1000), a 256 MiB buffer zeroed before every
    run to flush the L2 cache. CPU: ``time.perf_counter`` around each run (at least 3 runs).

    Raises:
        Whatever ``fn`` raises.
    """
    if device.type == "cuda":
        if _triton_testing is not None:
            try:
                return float(_triton_testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                      return_mode="median"))
            except TypeError:  # an old triton without return_mode: use the loop below
                pass
        return _cuda_event_median(fn, device, warmup_ms, rep_ms)
    est = _cpu_estimate(fn)
    n = int(min(50, max(3, rep_ms / max(est, 1e-3))))
    return statistics.median(_cpu_times(fn, n))


def _cuda_estimate(fn, flush, device) -> float:
    """ms per call of ``fn``: one untimed call, then three with the L2 flushed between CUDA
    events (the first call may compile or autotune, so it is not in the estimate)."""
    fn()
    _sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        flush.zero_()
        fn()
    end.record()
    _sync(device)
    return max(start.elapsed_time(end) / 3, 1e-3)


def _cuda_event_times(fn, flush, device, n: int) -> List[float]:
    """ms of each of ``n`` calls of ``fn``, the L2 flushed before each, CUDA events around it;
    one synchronisation at the end, so the host runs ahead as it does in a real loop."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    _sync(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _cuda_event_median(fn, device, warmup_ms, rep_ms) -> float:
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    est = _cuda_estimate(fn, flush, device)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = int(min(1000, max(5, rep_ms / est)))
    return statistics.median(_cuda_event_times(fn, flush, device, n))


def _cpu_estimate(fn) -> float:
    """ms per call of ``fn`` on the CPU: one untimed call, then one timed."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _cpu_times(fn, n: int) -> List[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, *,
                     rounds: int = 5, warmup_ms: float = 25.0,
                     rep_ms: float = 100.0) -> Dict[str, dict]:
    """Time several functions in alternation, so that a drift of the machine's speed (the
    host's clock, another process) falls on all of them alike and cancels in their ratios.

    Each ``fn`` is estimated once and warmed up once (``warmup_ms`` of calls; at least one
    call on CUDA), one after the other, in the order of ``fns``. Then ``rounds`` rounds: in
    round ``r`` every function is timed in turn, the order rotated by ``r`` places so that no
    function is always first, with about ``rep_ms / rounds`` of calls (at least one call per
    round; ``rep_ms`` of timed calls in all, as one :func:`time_ms` call), and the round's
    median is kept. A call is timed as by :func:`time_ms`'s CUDA event loop: the 256 MiB
    flush buffer zeroed before it, CUDA events around it; on the CPU ``time.perf_counter``.
    The call counts are the :func:`time_ms` loop's (5 to 1000 on CUDA, 3 to 50 on the CPU),
    shared out over the rounds. Compare two functions with :func:`paired_ratio` of their
    ``rounds_ms``.

    Args:
        fns: name -> function of no arguments (insertion order: warm-up order and round 0's).
        device: the device the functions run on (CUDA events on ``cuda``).
        rounds: number of rounds, >= 1.
        warmup_ms, rep_ms: warm-up and total timed time per function, in ms.

    Returns:
        name -> ``{"ms": median over rounds of the round medians (ms), or None when the
        function raised, "rounds_ms": [round median, ms, ...] (the completed rounds),
        "rounds": len(rounds_ms), "error": None or "ExceptionType: message"}``. A function
        that raises is recorded and left out of the later rounds; the others go on.

    Raises:
        ValueError: ``rounds`` < 1.
    """
    if rounds < 1:
        raise ValueError(f"ct3d bench: rounds must be >= 1, got {rounds}")
    cuda = device.type == "cuda"
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if cuda else None
    out = {name: {"ms": None, "rounds_ms": [], "rounds": 0, "error": None} for name in fns}
    calls: Dict[str, int] = {}  # timed calls per round, for the functions still running

    def fail(name, e):
        out[name]["error"] = _short_error(e)
        calls.pop(name, None)
        if cuda:
            try:  # let the queued work of the failed function finish before the next
                _sync(device)
            except Exception:  # noqa: BLE001  (a broken context: the others fail and say so)
                pass

    for name, fn in fns.items():
        try:
            if cuda:
                est = _cuda_estimate(fn, flush, device)
                for _ in range(max(1, int(warmup_ms / est))):
                    fn()
                _sync(device)
                total = min(1000, max(5, rep_ms / est))
            else:
                est = max(_cpu_estimate(fn), 1e-3)
                for _ in range(int(warmup_ms / est)):
                    fn()
                total = min(50, max(3, rep_ms / est))
            calls[name] = max(1, int(total / rounds))
        except Exception as e:  # noqa: BLE001  (recorded; the other functions go on)
            fail(name, e)
    names = list(fns)
    for r in range(rounds if names else 0):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name not in calls:
                continue
            try:
                if cuda:
                    times = _cuda_event_times(fns[name], flush, device, calls[name])
                else:
                    times = _cpu_times(fns[name], calls[name])
            except Exception as e:  # noqa: BLE001
                fail(name, e)
                continue
            out[name]["rounds_ms"].append(statistics.median(times))
    for res in out.values():
        res["rounds"] = len(res["rounds_ms"])
        if res["error"] is None and res["rounds_ms"]:
            res["ms"] = statistics.median(res["rounds_ms"])
    return out


def paired_ratio(num_rounds_ms: Sequence[float], den_rounds_ms: Sequence[float]) -> float:
    """Median over rounds of ``num / den`` of the same round (of :func:`time_interleaved`).

    Unitless. With the two timed close together in every round, a slow or fast stretch of the
    machine scales both and cancels in the ratio, which the ratio of the two medians does not
    guarantee.

    Raises:
        ValueError: the lists are empty or differ in length (one function failed mid-way).
    """
    if not num_rounds_ms or len(num_rounds_ms) != len(den_rounds_ms):
        raise ValueError(f"ct3d bench: paired_ratio needs rounds of equal, non-zero count, got "
                         f"{len(num_rounds_ms)} and {len(den_rounds_ms)}")
    return statistics.median(n / d for n, d in zip(num_rounds_ms, den_rounds_ms))


def _paired_speedup(model_round_ms: Optional[dict], num: str, den: str) -> Optional[float]:
    """:func:`paired_ratio` of two models' round medians (a row's ``model_round_ms``); None
    when either model has none (not timed, failed, a row from before v29) or a zero time."""
    a, b = (model_round_ms or {}).get(num), (model_round_ms or {}).get(den)
    if a and b and len(a) == len(b) and all(a) and all(b):
        return paired_ratio(a, b)
    return None


def _matmul_tflops(device, dtype, sizes, tf32: bool, warmup_ms, rep_ms) -> float:
    best = 0.0
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for n in sizes:
            a = torch.rand(n, n, device=device, dtype=dtype)
            b = torch.rand(n, n, device=device, dtype=dtype)
            ms = time_ms(lambda: torch.mm(a, b), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
            best = max(best, 2.0 * n ** 3 / (ms * 1e-3) / 1e12)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return best


def _copy_tbps(device, nbytes, warmup_ms, rep_ms) -> float:
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return 2.0 * src.numel() * 4 / (ms * 1e-3) / 1e12


def measure_ceilings(device: torch.device, dtype_mode: str = "fp32", *,
                     warmup_ms: float = 25.0, rep_ms: float = 100.0) -> dict:
    """Measure the device's matmul rate and copy bandwidth, the two ceilings of the floor.

    CUDA: float32 matmuls of 4096, 8192 and 16384 squared with TF32 allowed (the best rate
    counts), and a copy of 1 GiB (bytes read + written). For ``dtype_mode`` other than ``fp32``
    the rate of that precision is measured too (fp32-exact: float32 without TF32; bf16, fp16)
    and the floor uses it. CPU: float32 matmuls of 512 and 1024 and a 64 MiB copy (a smoke
    value only).

    Returns:
        ``{"tf32_tflops", "copy_TBps", "floor_tflops", "floor_rate_name", ...}``: rates in
        TFLOP/s (1e12 FLOP/s), bandwidth in TB/s (1e12 bytes/s).
    """
    cuda = device.type == "cuda"
    sizes = (4096, 8192, 16384) if cuda else (512, 1024)
    kw = dict(warmup_ms=warmup_ms, rep_ms=rep_ms)
    out = {}
    name = "tf32_tflops" if cuda else "cpu_fp32_tflops"
    out[name] = round(_matmul_tflops(device, torch.float32, sizes, True, **kw), 2)
    out["copy_TBps"] = round(_copy_tbps(device, (1 << 30) if cuda else (64 << 20), **kw), 4)
    used = name
    if cuda and dtype_mode != "fp32":
        if dtype_mode == "fp32-exact":
            used = "fp32_tflops"
            rate = _matmul_tflops(device, torch.float32, sizes[:2], False, **kw)
        else:
            used = f"{dtype_mode}_tflops"
            rate = _matmul_tflops(device, DTYPES[dtype_mode], sizes, False, **kw)
        out[used] = round(rate, 2)
    out["floor_rate_name"] = used
    out["floor_tflops"] = out[used]
    return out


def _then(text: str) -> str:
    head = text.split(":")[0]
    return "+ spatial_softmax" if "softmax" in head else f"+ {head}"


def _fused_chains(sites: Sequence[dict]) -> List[List[str]]:
    """The fused sites' chains, each with the kernel that runs after it when there is one (the
    report's ``then``) as "+ spatial_softmax" or "+ avg_pool3d(2) -> gelu"."""
    return [list(s.get("chain", [])) + ([_then(s["then"])] if s.get("then") else [])
            for s in sites if s.get("status") == "fused"]


class _CaptureFused(TorchDispatchMode):
    """Records every call of ``ct3d::conv_transpose3d_epilogue`` (op, args, kwargs)."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name == "ct3d::conv_transpose3d_epilogue":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _call_args(func, args, kwargs) -> dict:
    """The fused call's arguments by schema name (``input``, ``weight``, ... ``extras``)."""
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    return msg if len(msg) <= 2000 else msg[:2000] + " ..."


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Case:
    """One row to measure: ``build()`` returns (model in eval mode, list of input shapes)."""

    def __init__(self, id: str, kind: str, build: Callable[[], tuple], seed: int):
        self.id, self.kind, self.build, self.seed = id, kind, build, seed


def _measure(case: Case, opts, ceilings: dict, device: torch.device, log) -> dict:
    """Build, check and time one case; every stage's failure is recorded, never raised."""
    import ct3d_fx

    dtype = DTYPES[opts.dtype]
    row: dict = {k: None for k in ROW_KEYS}
    row.update(id=case.id, kind=case.kind, fused=[], errors={})
    errors = row["errors"]
    tkw = dict(warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms)

    torch.manual_seed(case.seed)
    model, shapes = case.build()
    row["input_shapes"] = [list(s) for s in shapes]
    ref64 = None if opts.no_fp64 else copy.deepcopy(model).double().to(device)
    model = model.to(device=device, dtype=dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(case.seed)
    inputs = [torch.rand(s, generator=gen, device=device, dtype=torch.float32).to(dtype)
              for s in shapes]

    conv_calls: list = []
    model_round_ms: Dict[str, List[float]] = {}  # the whole models' round medians, ms

    def conv_hook(mod, inp, out):
        conv_calls.append((tuple(inp[0].shape), tuple(mod.weight.shape), tuple(out.shape),
                           mod.groups, inp[0].element_size()))

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules()
             if isinstance(m, nn.ConvTranspose3d)]
    with torch.no_grad():
        try:
            out_eager = model(*inputs)
        finally:
            for h in hooks:
                h.remove()
        _sync(device)
        out64 = None
        if ref64 is not None:
            try:
                out64 = ref64(*[t.double() for t in inputs])
            except Exception as e:  # noqa: BLE001
                errors["fp64"] = _short_error(e)
            del ref64
        if out64 is not None:
            row["eager_max_rel_err_vs_fp64"] = max_rel_err(out_eager, out64)

        log(f"{case.id}: ct3d_fx.optimize")
        opt, fused_calls = None, []
        try:
            # optimize() may rewrite submodules in place when a model does not trace as a
            # whole; a copy keeps ``model`` eager for the eager and torch.compile timings.
            # The runner measures the errors itself (below), so optimize's own verification is
            # off: an inaccurate rewrite is still timed and its error shows in the row.
            target = copy.deepcopy(model)
            opt = ct3d_fx.optimize(target, tuple(inputs), config=ct3d_fx.Config(verify=False))
            if opt is target:
                row["note"] = "optimized per submodule, in place (the model did not trace whole)"
            sites = opt.ct3d_report.to_dict()["sites"]
            row["sites"] = sites
            row["fused"] = _fused_chains(sites)
            row["implementations"] = sorted({str(s.get("implementation")) for s in sites
                                             if s.get("status") == "fused"})
            with _CaptureFused() as cap:
                out_opt = opt(*inputs)
            _sync(device)
            fused_calls = cap.calls
            row["n_fused_calls"] = len(fused_calls)
            row["max_rel_err_vs_eager"] = max_rel_err(out_opt, out_eager)
            if out64 is not None:
                row["max_rel_err_vs_fp64"] = max_rel_err(out_opt, out64)
            del out_opt
        except Exception as e:  # noqa: BLE001
            errors["ct3d"] = _short_error(e)
            log(f"{case.id}: ct3d_fx failed: {errors['ct3d']}")
            opt = None

        compiled = None
        if not opts.no_compile:
            log(f"{case.id}: torch.compile (first call compiles)")
            torch._dynamo.reset()
            try:
                compiled = torch.compile(model)
                t0 = time.perf_counter()
                out_c = compiled(*inputs)
                _sync(device)
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                if out64 is not None:
                    row["compile_max_rel_err_vs_fp64"] = max_rel_err(out_c, out64)
                del out_c
            except Exception as e:  # noqa: BLE001
                errors["compile"] = _short_error(e)
                log(f"{case.id}: torch.compile failed: {errors['compile']}")
                compiled = None
        compiled_opt = None
        if not opts.no_compile and opt is not None:
            # torch.compile over the optimized model: inductor fuses what ct3d_fx leaves to
            # eager (norms, pooling, softmax), the fused op stays one opaque kernel.
            log(f"{case.id}: torch.compile(ct3d_fx.optimize(model))")
            torch._dynamo.reset()
            try:
                compiled_opt = torch.compile(opt)
                out_co = compiled_opt(*inputs)
                _sync(device)
                row["ct3d_compile_max_rel_err_vs_eager"] = max_rel_err(out_co, out_eager)
                del out_co
            except Exception as e:  # noqa: BLE001
                errors["ct3d_compile"] = _short_error(e)
                log(f"{case.id}: torch.compile of the optimized model failed: "
                    f"{errors['ct3d_compile']}")
                compiled_opt = None
        del out_eager, out64
        _free(device)

        log(f"{case.id}: timing")

        def timed(key, fn):
            try:
                row[key] = round(time_ms(fn, device, **tkw), 4)
            except Exception as e:  # noqa: BLE001
                errors[key] = _short_error(e)

        # The whole models, by the prefix of their keys (eager_ms, ...; model_round_ms).
        models = {"eager": lambda: model(*inputs)}
        if compiled is not None:
            models["compile"] = lambda: compiled(*inputs)
        if opt is not None:
            models["ct3d"] = lambda: opt(*inputs)
        if compiled_opt is not None:
            models["ct3d_compile"] = lambda: compiled_opt(*inputs)
        tails: dict = {}
        if opt is not None:
            from . import norm_tail, pool_tail

            tails = {"norm_tail": norm_tail, "pool_tail": pool_tail}
        # The tails' autotune decides on the optimized model's first timed calls (the warm-up):
        # what their memos gain from here on are this row's decisions.
        before = {name: set(m._choices) for name, m in tails.items()}
        for m in tails.values():
            m.LAST_KERNEL = None
        last_kernel: dict = {}
        if opts.rounds == 1:
            # one time_ms per model, in turn (the runner before v29)
            for name, fn in models.items():
                timed(f"{name}_ms", fn)
                if name == "ct3d":
                    last_kernel = {n: m.LAST_KERNEL for n, m in tails.items()}
                if row[f"{name}_ms"] is not None:
                    model_round_ms[name] = [row[f"{name}_ms"]]
        else:
            # Interleaved rounds: a drift of the host's speed during the row (these models
            # are host bound at small batches) falls on every model alike.
            try:
                res = time_interleaved(models, device, rounds=opts.rounds, **tkw)
            except Exception as e:  # noqa: BLE001  (e.g. no memory for the flush buffer)
                res = {name: {"ms": None, "rounds_ms": [], "error": _short_error(e)}
                       for name in models}
            for name, r in res.items():
                if r["error"] is not None:
                    errors[f"{name}_ms"] = r["error"]
                elif r["ms"] is not None:
                    row[f"{name}_ms"] = round(r["ms"], 4)
                    model_round_ms[name] = [round(t, 4) for t in r["rounds_ms"]]
            if tails and row["ct3d_ms"] is not None:
                # torch.compile's calls of the optimized model come between the optimized
                # model's own in the rounds and may run the same tails: one more forward
                # says what the optimized model's calls ran (its autotune choices are kept).
                for m in tails.values():
                    m.LAST_KERNEL = None
                try:
                    opt(*inputs)
                    _sync(device)
                except Exception as e:  # noqa: BLE001
                    errors["tail_kernel_ran"] = _short_error(e)
            last_kernel = {n: m.LAST_KERNEL for n, m in tails.items()}
        row["model_round_ms"] = model_round_ms
        if tails:
            # the tails' autotune decisions made by this row's first timed calls, and whether
            # each tail's last call ran its kernel (True) or PyTorch's ops (False)
            row["tail_autotune"] = [
                {"tail": name, "choice": m._choices[k],
                 "ms": {c: round(t, 4) for c, t in m._timings.get(k, {}).items()}}
                for name, m in tails.items() for k in m._choices if k not in before[name]]
            row["tail_kernel_ran"] = {n: v for n, v in last_kernel.items() if v is not None}
        if fused_calls:
            from .ops import reference

            bound = [_call_args(f, a, k) for f, a, k in fused_calls]
            from . import _cuda

            # the autotune's choice per fused call (made on the first optimized call)
            keys = {_cuda._key(*a) for f, a, k in fused_calls if not k and len(a) == 11}
            row["autotune"] = [v for (key, _), v in _cuda.autotune_choices().items()
                               if key in keys]
            # and the candidates' medians it decided by (ms per call, its own timer)
            row["autotune_ms"] = [{c: round(m, 4) for c, m in v.items()}
                                  for (key, _), v in _cuda.autotune_timings().items()
                                  if key in keys]

            # the fused kernel itself: no per-shape autotune choice of cuDNN + PyTorch ops
            tuned, _cuda.AUTOTUNE = _cuda.AUTOTUNE, False
            try:
                timed("fused_op_ms", lambda: [f(*a, **k) for f, a, k in fused_calls])
            finally:
                _cuda.AUTOTUNE = tuned
            timed("eager_conv_epilogue_ms", lambda: [reference(**b) for b in bound])

    # The floor covers what fused_op_ms times: the fused calls' convolutions when there are
    # any, else every ConvTranspose3d of the eager model.
    costs = []
    if fused_calls:
        from .ops import output_shape

        for b in (_call_args(f, a, k) for f, a, k in fused_calls):
            x, w = b["input"], b["weight"]
            y = output_shape(x, w, b["stride"], b["padding"], b["output_padding"],
                             b["dilation"], b["groups"])
            costs.append(conv_cost(x.shape, w.shape, y, b["groups"], x.element_size()))
    else:
        costs = [conv_cost(i, w, o, g, e) for i, w, o, g, e in conv_calls]
    if costs:
        flops = sum(c[0] for c in costs)
        nbytes = sum(c[1] for c in costs)
        row["conv_gflop"] = round(flops / 1e9, 3)
        row["conv_bytes_MB"] = round(nbytes / 1e6, 2)
        if ceilings.get("floor_tflops") and ceilings.get("copy_TBps"):
            row["floor_ms"] = round(max(flops / (ceilings["floor_tflops"] * 1e12),
                                        nbytes / (ceilings["copy_TBps"] * 1e12)) * 1e3, 4)
    if row["floor_ms"] and row["fused_op_ms"]:
        row["floor_ratio"] = round(row["fused_op_ms"] / row["floor_ms"], 2)
    # Whole models: the median of the rounds' ratios (with one round, the ratio of the two
    # medians); the op timings were taken apart, so theirs is the ratio of the medians.
    for key, num, den in (("speedup_vs_eager", "eager", "ct3d"),
                          ("speedup_vs_compile", "compile", "ct3d"),
                          ("ct3d_compile_speedup_vs_compile", "compile", "ct3d_compile")):
        x = _paired_speedup(model_round_ms, num, den)
        if x is not None:
            row[key] = round(x, 3)
    if row.get("eager_conv_epilogue_ms") and row.get("fused_op_ms"):
        row["op_speedup"] = round(row["eager_conv_epilogue_ms"] / row["fused_op_ms"], 3)
    if compiled is not None:
        torch._dynamo.reset()  # drop the compiled graphs and what they hold
    del model, inputs, opt, compiled, fused_calls
    _free(device)
    return row


# ------------------------------------------------------------------------------------------
# Cases, output, command line
# ------------------------------------------------------------------------------------------

def _seed_for(base: int, case_id: str) -> int:
    return (base + zlib.crc32(case_id.encode())) % (2 ** 31)


def _load_example(name: str):
    path = EXAMPLES_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"ct3d bench: network {name!r} needs {path} (the repository's "
                                f"examples/ folder)")
    spec = importlib.util.spec_from_file_location(f"ct3d_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cases(opts, suite: Optional[dict], scale: float) -> List[Case]:
    cases = []
    if suite is not None:
        for entry in suite["problems"]:
            cases.append(Case(entry["id"], "suite",
                              lambda e=entry: build_problem(e, scale),
                              _seed_for(opts.seed, entry["id"])))
    for name in opts.networks:
        for batch in opts.batches:
            cid = f"{name}_b{batch}"

            def build(name=name, batch=batch):
                return _load_example(name).build(batch, tiny=scale < 1)

            cases.append(Case(cid, "network", build, _seed_for(opts.seed, cid)))
    if opts.only:
        pat = re.compile(opts.only)
        cases = [c for c in cases if pat.search(c.id)]
    return cases


class _Progress:
    """tqdm over the cases when installed, else a plain ``[i/n] id`` counter on stderr."""

    def __init__(self, cases: list, quiet: bool = False):
        self.cases, self.quiet = cases, quiet
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._bar = tqdm(total=len(cases), file=sys.stderr, unit="case",
                         dynamic_ncols=True) if tqdm is not None and not quiet else None

    def __iter__(self):
        n = len(self.cases)
        try:
            for i, case in enumerate(self.cases):
                if self._bar is not None:
                    self._bar.set_description(case.id)
                elif not self.quiet:
                    print(f"[{i + 1}/{n}] {case.id}", file=sys.stderr, flush=True)
                yield case
                if self._bar is not None:
                    self._bar.update(1)
        finally:
            if self._bar is not None:
                self._bar.close()

    def write(self, msg: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)


def _git_commit() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except Exception:  # noqa: BLE001  (no git, not a checkout)
        return None


def _environment(device: torch.device, opts) -> dict:
    import ct3d_fx

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, "\
               f"{torch.get_num_threads()} threads)"
    return {
        "about": ABOUT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "ct3d_fx": getattr(ct3d_fx, "__version__", None),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "dtype": opts.dtype,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "scale": opts.scale,
        "timer": _timer_text(device, opts.rounds),
        "rounds": opts.rounds,
        "argv": sys.argv[1:],
    }


def _timer_text(device: torch.device, rounds: int) -> str:
    """The results' ``timer``: how the rows were timed (model rows differ since v29)."""
    cuda = device.type == "cuda"
    one = ("triton.testing.do_bench median" if cuda and _triton_testing is not None else
           "CUDA events median, L2 flushed" if cuda else "time.perf_counter median")
    each = "CUDA events around each call, L2 flushed before it" if cuda else \
        "time.perf_counter around each call"
    text = one if rounds == 1 else (
        f"whole models: {rounds} interleaved rounds ({each}), median of the round medians, "
        f"speedups the median of the rounds' ratios; fused op and conv+epilogue: {one}")
    return text if cuda else text + " (CPU smoke run)"


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _write_json(results: dict, path: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    os.replace(tmp, path)


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_err(v):
    if isinstance(v, float):
        return "0" if v == 0 else f"{v:.1e}"
    return _fmt(v)


_TABLE = (("id", "id"), ("eager ms", "eager_ms"), ("compile ms", "compile_ms"),
          ("ct3d ms", "ct3d_ms"), ("x eager", "speedup_vs_eager"),
          ("x compile", "speedup_vs_compile"), ("ct3d+compile ms", "ct3d_compile_ms"),
          ("x compile'", "ct3d_compile_speedup_vs_compile"), ("op ms", "fused_op_ms"),
          ("conv+epi ms", "eager_conv_epilogue_ms"), ("x op", "op_speedup"),
          ("floor ms", "floor_ms"), ("op/floor", "floor_ratio"),
          ("err eager", "max_rel_err_vs_eager"), ("err fp64", "max_rel_err_vs_fp64"),
          ("eager err fp64", "eager_max_rel_err_vs_fp64"))


def format_table(results: dict, tablefmt: str = "simple") -> str:
    """The results as one ``tabulate`` table (times in ms, ``x ...`` columns are speedups).

    The last column lists the fused chains, or the first failing stage (``! stage: error``).
    """
    from tabulate import tabulate

    body = []
    for r in results["rows"]:
        cells = [_fmt_err(r.get(k)) if "err" in k else
                 _fmt(r.get(k), 2 if "speedup" in k or k == "floor_ratio" else 3)
                 for _, k in _TABLE]
        cells[0] = r["id"]
        counts: Dict[str, int] = {}
        for chain in r.get("fused") or []:
            key = " -> ".join(chain)
            counts[key] = counts.get(key, 0) + 1
        note = "; ".join(k if n == 1 else f"{n}x {k}" for k, n in counts.items())
        if r.get("errors"):
            stage, msg = next(iter(r["errors"].items()))
            note = (note + "; " if note else "") + f"! {stage}: {msg.splitlines()[0][:80]}"
        body.append(cells + [note or "(nothing fused)"])
    return tabulate(body, headers=[h for h, _ in _TABLE] + ["fused"], tablefmt=tablefmt,
                    disable_numparse=True)


def _header_lines(results: dict) -> List[str]:
    c = results.get("ceilings") or {}
    ceil = ", ".join(f"{k} {v}" for k, v in c.items())
    return [f"date {results.get('date')}, device {results.get('device')}, torch "
            f"{results.get('torch')}, CUDA {results.get('cuda')}, cuDNN {results.get('cudnn')}, "
            f"dtype {results.get('dtype')}, commit {results.get('git_commit')}",
            f"ceilings: {ceil}", f"timer: {results.get('timer')}"]


def write_markdown(results: dict, path: str) -> None:
    """Write the run's header and table as a Markdown fragment (for docs/performance.md)."""
    text = "\n".join(["<!-- written by python -m ct3d_fx.bench --markdown -->", ""]
                     + [f"- {line}" for line in _header_lines(results)]
                     + ["", format_table(results, "github"), ""])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def write_plot(results: dict, path: str) -> bool:
    """Write a PNG bar chart of the speedups (log scale); False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("ct3d bench: matplotlib is not installed; no plot written", stacklevel=2)
        return False
    rows = results["rows"]
    series = (("ct3d_fx vs eager", "speedup_vs_eager"),
              ("torch.compile vs eager", None),
              ("fused op vs conv + epilogue", "op_speedup"))
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.42 * len(rows)))
    h = 0.27
    for j, (label, key) in enumerate(series):
        vals = []
        for r in rows:
            if key is None:
                # paired like the row's speedups where the rounds are there (v29 on)
                x = _paired_speedup(r.get("model_round_ms"), "eager", "compile")
                if x is None and r.get("eager_ms") and r.get("compile_ms"):
                    x = r["eager_ms"] / r["compile_ms"]
                vals.append(float("nan") if x is None else x)
            else:
                vals.append(r.get(key) or float("nan"))
        ax.barh([i + (j - 1) * h for i in range(len(rows))], vals, height=h, label=label)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["id"] for r in rows])
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup (higher is better; 1 = baseline)")
    ax.set_title(f"ct3d_fx on {results.get('device')} ({results.get('dtype')}, "
                 f"torch {results.get('torch')})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m ct3d_fx.bench",
        description="Benchmark ct3d_fx.optimize against PyTorch eager and torch.compile on the "
                    "ConvTranspose3d suite (benchmarks/suite.json) and two whole networks "
                    "(examples/), check its results against eager and float64, and compare the "
                    "fused op with the measured roofline floor. Prints one table; writes JSON, "
                    "a PNG chart and a Markdown table on request.",
        epilog="Full runs take longer than 10 minutes (torch.compile compiles every problem): "
               "split them with --only and join the parts with --merge; see "
               "benchmarks/README.md.")
    p.add_argument("--suite", default=str(DEFAULT_SUITE),
                   help="suite JSON file (default: %(default)s)")
    p.add_argument("--only", metavar="REGEX",
                   help="run only rows whose id matches REGEX (re.search), e.g. '^l1_' or "
                        "'unet'; applies to suite problems and networks")
    p.add_argument("--list", action="store_true", help="print the row ids and exit")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="fp32: float32 with PyTorch's TF32 defaults (cuDNN TF32 on); "
                        "fp32-exact: TF32 off for cuDNN and matmul; bf16/fp16: model and "
                        "inputs cast (default: %(default)s)")
    p.add_argument("--device", default="cuda",
                   help="cuda (default), cuda:N, or cpu (a tiny smoke run on the reference path)")
    p.add_argument("--scale", type=float, default=None,
                   help="shrink batch and spatial sizes by this factor in (0, 1]; networks run "
                        f"tiny when < 1 (default: 1 on CUDA, {TINY_SCALE} on the CPU)")
    p.add_argument("--tiny", action="store_true", help=f"same as --scale {TINY_SCALE}")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-fp64", action="store_true",
                   help="skip the float64 reference (max_rel_err_vs_fp64 stays null)")
    p.add_argument("--networks", default="all",
                   help=f"comma-separated networks to run after the suite: "
                        f"{', '.join(NETWORKS)}; 'all' (default) or 'none'")
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                   help="batch sizes for the networks (default: %(default)s)")
    p.add_argument("--no-suite", action="store_true", help="run the networks only")
    p.add_argument("--json", metavar="PATH", help="write results as JSON (rewritten after each "
                                                  "row, so an interrupted run keeps its rows)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart of speedups (needs "
                                                  "matplotlib; skipped with a warning without)")
    p.add_argument("--markdown", metavar="PATH",
                   help="write the header and table as Markdown (for docs/performance.md)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="do not run: join the rows of earlier --json files (later files win "
                        "for repeated ids) and print/write them like a run")
    p.add_argument("--warmup-ms", type=float, default=25.0,
                   help="warm-up per timing in ms (default: %(default)s)")
    p.add_argument("--rep-ms", type=float, default=100.0,
                   help="timed runs per timing in ms (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, metavar="N",
                   help="time the whole models of a row (eager, torch.compile, ct3d_fx, "
                        "ct3d_fx + torch.compile) in N interleaved rounds of about "
                        "rep-ms / N each, the order rotated per round; *_ms is the median of "
                        "the round medians (model_round_ms in the JSON), speedup_vs_* the "
                        "median of the rounds' ratios, so a drift of the machine's speed "
                        "cancels; 1: one time_ms per model in turn and ratios of the medians "
                        "(the runner before v29) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    p.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                   help="start no new row once the run has used SECONDS minus the slowest row "
                        "so far; the rows not run are listed (JSON 'not_run') with an --only "
                        "pattern to continue")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    opts = p.parse_args(argv)
    if opts.tiny:
        if opts.scale not in (None, TINY_SCALE):
            p.error("--tiny and --scale disagree; give one of them")
        opts.scale = TINY_SCALE
    if opts.scale is not None and not 0 < opts.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {opts.scale}")
    if opts.rounds < 1:
        p.error(f"--rounds must be >= 1, got {opts.rounds}")
    nets = [n.strip() for n in opts.networks.split(",") if n.strip()]
    if nets == ["all"]:
        nets = list(NETWORKS)
    elif nets == ["none"]:
        nets = []
    bad = [n for n in nets if n not in NETWORKS]
    if bad:
        p.error(f"--networks: unknown {bad}; choose from {', '.join(NETWORKS)}, all, none")
    opts.networks = nets
    try:
        opts.batches = [int(b) for b in opts.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {opts.batches!r}")
    if any(b < 1 for b in opts.batches):
        p.error(f"--batches must be positive, got {opts.batches}")
    if opts.only:
        try:
            re.compile(opts.only)
        except re.error as e:
            p.error(f"--only: bad regular expression {opts.only!r}: {e}")
    return opts


def _merge(paths: Sequence[str]) -> dict:
    merged, rows = None, {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "rows"}
            merged["merged_from"] = []
        else:
            for key in ("device", "torch", "cudnn", "dtype", "rounds"):
                if data.get(key) != merged.get(key):
                    warnings.warn(f"ct3d bench: {path} has {key}={data.get(key)!r}, the first "
                                  f"file {merged.get(key)!r}; ratios across runs are not "
                                  f"comparable", stacklevel=2)
        merged["merged_from"].append({"file": str(path), "date": data.get("date"),
                                      "ceilings": data.get("ceilings")})
        for r in data.get("rows", []):
            # rows of older files lack the newer keys (model_round_ms before v29): null, as a
            # skipped stage's, so every merged row has ROW_KEYS
            rows[r["id"]] = dict({k: None for k in ROW_KEYS}, **r)
    merged["rows"] = list(rows.values())
    missing = [i for path in paths for i in json.loads(Path(path).read_text()).get("not_run", [])
               if i not in rows]
    merged.pop("not_run", None)
    if missing:
        merged["not_run"] = list(dict.fromkeys(missing))
    return merged


def run(opts) -> dict:
    """Run the cases selected by ``opts`` (parsed command-line options); return the results.

    Returns:
        ``{"date", "device", "torch", "cuda", "cudnn", ..., "ceilings": {...}, "rows": [...]}``,
        one row per case with at least the keys in :data:`ROW_KEYS` (times in ms, errors
        unitless, ``fused`` a list of chains, each a list of op names) plus ``errors``:
        ``{stage: message}`` for every stage that failed.

    Raises:
        RuntimeError: ``--device cuda`` without a usable GPU.
        FileNotFoundError, ValueError: see :func:`load_suite`.
    """
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("ct3d bench: --device cuda but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}); use --device cpu for the smoke run")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if opts.scale is None:
        opts.scale = 1.0 if device.type == "cuda" else TINY_SCALE
    suite = None if opts.no_suite else load_suite(opts.suite)
    cases = _cases(opts, suite, opts.scale)
    if opts.list:
        for c in cases:
            print(c.id)
        return {"rows": []}
    if not cases:
        raise ValueError(f"ct3d bench: nothing to run (--only {opts.only!r} matched no id; "
                         f"see --list)")

    old_tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if opts.dtype == "fp32-exact":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    run_start = time.perf_counter()
    progress = _Progress(cases, opts.quiet)
    try:
        results = _environment(device, opts)
        progress.write(f"ct3d bench: {len(cases)} case(s) on {results['device']}, dtype "
                       f"{opts.dtype}, scale {opts.scale}; measuring ceilings")
        results["ceilings"] = measure_ceilings(device, opts.dtype, warmup_ms=opts.warmup_ms,
                                               rep_ms=opts.rep_ms)
        progress.write(f"ct3d bench: ceilings {results['ceilings']}")
        results["rows"] = []
        slowest = 0.0
        for i, case in enumerate(progress):
            elapsed = time.perf_counter() - run_start
            if opts.budget_s and elapsed + slowest > opts.budget_s:
                rest = [c.id for c in cases[i:]]
                results["not_run"] = rest
                progress.write(f"ct3d bench: stopping after {elapsed:.0f} s (--budget-s "
                               f"{opts.budget_s:g}, the slowest row took {slowest:.0f} s); not "
                               f"run: {', '.join(rest)}; continue with --only "
                               f"'^({'|'.join(rest)})$'")
                break
            t0 = time.perf_counter()
            log = progress.write if not opts.quiet else (lambda m: None)
            try:
                row = _measure(case, opts, results["ceilings"], device, log)
            except Exception as e:  # noqa: BLE001  (build or eager failed: record, go on)
                row = {k: None for k in ROW_KEYS}
                row.update(id=case.id, kind=case.kind, fused=[],
                           errors={"run": _short_error(e)},
                           traceback=traceback.format_exc(limit=8))
            _free(device)  # after the except block, which keeps the failed frames alive
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            slowest = max(slowest, row["wall_s"])
            results["rows"].append(row)
            progress.write(_summary(row))
            if opts.json:
                _write_json(results, opts.json)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return results


def _summary(row: dict) -> str:
    parts = [f"{k.replace('_ms', '')} {_fmt(row.get(k))} ms" for k in
             ("eager_ms", "compile_ms", "ct3d_ms", "fused_op_ms", "eager_conv_epilogue_ms",
              "floor_ms") if row.get(k) is not None]
    parts.append(f"err fp64 {_fmt(row.get('max_rel_err_vs_fp64'))}")
    if row.get("errors"):
        parts.append("failed: " + ", ".join(row["errors"]))
    return f"  {row['id']} ({row.get('wall_s')} s): " + ", ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status.

    0: every row ran (torch.compile failures are recorded in the rows and do not count);
    1: some row had another failed stage (see its ``errors``); 2: bad usage or no GPU;
    3: ``--budget-s`` stopped the run before every row ran (JSON ``not_run`` lists them).
    """
    opts = _parse_args(argv)
    if opts.merge:
        results = _merge(opts.merge)
    else:
        try:
            results = run(opts)
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if opts.list:
            return 0
    if opts.json:
        _write_json(results, opts.json)
    print("\n".join(_header_lines(results)))
    print(format_table(results))
    if opts.markdown:
        write_markdown(results, opts.markdown)
    if opts.plot:
        write_plot(results, opts.plot)
    failed = [r["id"] for r in results["rows"] if set(r.get("errors") or ()) - {"compile"}]
    if failed:
        print(f"{len(failed)} row(s) where building, eager, ct3d_fx, float64 or a timing failed "
              f"(see 'errors' in the JSON): {', '.join(failed)}", file=sys.stderr)
    if results.get("not_run"):
        print(f"not run (--budget-s): {', '.join(results['not_run'])}", file=sys.stderr)
    return 1 if failed else 3 if results.get("not_run") else 0


if __name__ == "__main__":
    sys.exit(main())
