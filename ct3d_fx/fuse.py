"""The pass: trace, find matches (with a reason for every rejection), rewrite, lint, recompile.

Data flow: :func:`torch.fx.symbolic_trace` -> for each ConvTranspose3d anchor, :func:`match` grows the
largest DAG of fusable elementwise nodes that ends in one node -> :func:`_rewrite` replaces it by one
call of a :class:`FusedSite` (which calls ``torch.ops.ct3d.conv_transpose3d_epilogue``) whose
tensor inputs are ``get_attr`` nodes of the original submodules -> ``graph.lint()`` ->
``recompile()``. The result shares every submodule, Parameter and buffer with the original model.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import _cuda, patterns
from . import norm_tail as _norm_tail
from . import pool_tail as _pool_tail
from . import spatial_softmax as _spatial
from .config import Config, VerificationError
from .ops import INSTR_WIDTH, Opcode
from .report import RewriteReport, SiteRecord

__all__ = ["optimize", "explain", "report", "FusedSite"]

_SITES = "_ct3d_sites"

# Elementwise ops the kernel does not implement (a different reason from "not elementwise").
_ELEMENTWISE_UNSUPPORTED = {
    "exp", "exp_", "log", "log_", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "sin", "cos", "erf",
    "floor", "ceil", "round", "trunc", "sign", "reciprocal", "where", "maximum", "minimum",
    "float", "half", "bfloat16", "double", "to", "type", "logsigmoid", "softsign", "threshold",
    "tanhshrink", "hardshrink", "softshrink", "rrelu", "glu", "log1p", "expm1", "fmod",
    "remainder", "floor_divide", "lerp", "addcmul", "addcdiv",
}


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------
class Untraceable(Exception):
    """symbolic_trace failed on a module; the message says why."""


def _trace(model: nn.Module) -> fx.GraphModule:
    """symbolic_trace, with buffers traced as get_attr values like parameters.

    Plain symbolic_trace evaluates expressions of buffers at trace time (``self.scale.view(...)``
    would become a frozen constant); proxied buffers keep them live, so later changes to a
    buffer or a loaded checkpoint show in the optimized model.
    """
    tracer = fx.Tracer()
    tracer.proxy_buffer_attributes = True
    try:
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # any failure inside user code while tracing
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Untraceable(f"{type(e).__name__}: {msg}") from e


def _modules(gm: fx.GraphModule) -> Dict[str, nn.Module]:
    return dict(gm.named_modules(remove_duplicate=False))


def _short(node: fx.Node, modules) -> str:
    """Name of one chain element for the report: module class or function/method name."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def _label(node: fx.Node, modules) -> str:
    """How the report names a node: ``ReLU (up.2)`` for modules, ``mul`` for functions."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    if node.op == "output":
        return "the graph output"
    return repr(node.name)


def _site_fqn(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
    return f"{path}.{node.name}" if path else node.name


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------
@dataclass
class Match:
    """One site: the anchor, the fused chain (topological order, anchor first) and why it ends."""

    anchor: fx.Node
    nodes: List[fx.Node]
    stop: Optional[str]
    conv: Dict[str, Any]
    reason: Optional[str] = None            # set when the whole site is left alone
    specs: Dict[fx.Node, Tuple[Any, Dict[str, Any], Optional[nn.Module]]] = field(
        default_factory=dict)

    @property
    def sink(self) -> fx.Node:
        return self.nodes[-1]


def _node_args(node: fx.Node) -> List[fx.Node]:
    return list(node.all_input_nodes)


def _downstream(anchor: fx.Node) -> set:
    seen, todo = {anchor}, [anchor]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _param_derived(node: fx.Node, cache: Dict[fx.Node, bool]) -> bool:
    """True when ``node`` is computed from get_attr nodes and constants only (no model input)."""
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        r = True
    elif node.op in ("placeholder", "output"):
        r = False
    else:
        r = all(_param_derived(a, cache) for a in node.all_input_nodes)
    cache[node] = r
    return r


def _conv_args(anchor: fx.Node, modules) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The anchor's convolution parameters, or a reason why this call cannot be fused."""
    if anchor.op == "call_module":
        m = modules[anchor.target]
        if m.padding_mode != "zeros":
            return None, f"padding_mode={m.padding_mode!r} is not supported"
        if not isinstance(m.padding, tuple) or any(not isinstance(p, int) for p in m.padding):
            return None, f"padding={m.padding!r} is not an int triple"
        osz = anchor.args[1] if len(anchor.args) > 1 else anchor.kwargs.get("output_size")
        # output_size computed at run time (``skip.shape``) becomes an argument of the site
        dynamic = isinstance(osz, fx.Node) or (isinstance(osz, (list, tuple)) and
                                               any(isinstance(s, fx.Node) for s in osz))
        return dict(module=m, input=anchor.args[0] if anchor.args else anchor.kwargs["input"],
                    weight=None, bias=None, stride=list(m.stride), padding=list(m.padding),
                    output_padding=list(m.output_padding), dilation=list(m.dilation),
                    groups=int(m.groups),
                    output_size=None if osz is None or dynamic else list(osz),
                    output_size_arg=osz if dynamic else None), None

    def sig(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
            dilation=1):
        ...
    import inspect
    try:
        b = inspect.signature(sig).bind(*anchor.args, **anchor.kwargs)
    except TypeError as e:
        return None, f"cannot bind conv_transpose3d arguments: {e}"
    b.apply_defaults()
    a = b.arguments
    out = dict(module=None, input=a["input"], weight=a["weight"], bias=a["bias"], output_size=None,
               output_size_arg=None)
    for k in ("stride", "padding", "output_padding", "dilation"):
        v = a[k]
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v] * 3
        if not (isinstance(v, (list, tuple)) and len(v) in (1, 3) and
                all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            return None, f"{k}={v!r} is not constant ints (e.g. computed at run time)"
        out[k] = list(v) * (3 if len(v) == 1 else 1)
    if not (isinstance(a["groups"], int) and not isinstance(a["groups"], bool)):
        return None, f"groups={a['groups']!r} is not a constant int"
    out["groups"] = a["groups"]
    if not isinstance(a["weight"], fx.Node):
        return None, "weight is not a graph value"
    if a["bias"] is not None and not isinstance(a["bias"], fx.Node):
        return None, "bias is not a graph value"
    return out, None


def _elementwise_reason(node: fx.Node, modules) -> str:
    desc = patterns.describe(node, modules)
    name = str(getattr(node.target, "__name__", node.target))
    if node.op == "output":
        return "the result is a graph output"
    if name in _ELEMENTWISE_UNSUPPORTED:
        return f"{desc} is elementwise but not supported by the fused kernel"
    return f"{desc} is not elementwise"


def _candidate(node: fx.Node, S: set, tainted: set, modules, config: Config, pcache):
    """(spec, bound, module) when ``node`` can join the chain, else a reason string."""
    if patterns.is_anchor(node, modules):
        return f"feeds another ConvTranspose3d ({_site_fqn(node)})"
    spec = patterns.lookup(node, modules)
    if spec is None:
        return _elementwise_reason(node, modules)
    m = modules.get(node.target) if node.op == "call_module" else None
    try:
        bound = spec.bind(*node.args, **node.kwargs)
    except TypeError as e:
        return f"{patterns.describe(node, modules)}: cannot bind arguments ({e})"
    name = patterns.describe(node, modules)
    if spec.family not in config.families:
        return f"{name} (family {spec.family!r}) is disabled by Config.families"
    if spec.check is not None:
        r = spec.check(bound, m)
        if r:
            return r
    if not isinstance(bound.get("input"), fx.Node) and node.op != "call_module":
        # reversed operands such as operator.sub(2.0, x): the chain value is "other"
        if not (spec.operands == ("input", "other") and bound.get("other") in S):
            return f"{name}: first operand is not a tensor of the chain"
    # every tensor argument is either a chain value (in an operand slot) or external
    for k, v in bound.items():
        vs = v if isinstance(v, (list, tuple)) else [v]
        for x in vs:
            if not isinstance(x, fx.Node):
                continue
            if x in S:
                if k not in spec.operands:
                    return f"{name}: chain value used as {k!r}"
            elif x in tainted:
                return f"{name}: operand {x.name!r} depends on the conv output outside the chain"
            elif k in spec.operands and not _param_derived(x, pcache):
                if "residual" not in config.families:
                    return (f"{name}: side input {x.name!r} (family 'residual') is disabled "
                            f"by Config.families")
    if _is_inplace(spec, bound, m):
        tgt = bound.get("input")
        if not (isinstance(tgt, fx.Node) and tgt in S):
            return f"in-place {name} mutates {getattr(tgt, 'name', tgt)!r}, outside the chain"
        # the storage it overwrites is also that of every value tgt aliases (y.detach().relu_())
        for a in _alias_chain(tgt, modules):
            if len(a.users) > 1:
                return (f"in-place {name} overwrites {a.name!r}, which has {len(a.users)} "
                        f"users")
    return spec, bound, m


def _conv_channels(anchor: fx.Node, conv: Dict[str, Any]) -> Optional[int]:
    """C_out of the anchor's convolution when tracing knows it (module, or functional with a
    parameter or buffer as weight), else None."""
    if conv.get("module") is not None:
        return int(conv["module"].out_channels)
    w = conv.get("weight")
    if isinstance(w, fx.Node) and w.op == "get_attr":
        obj: Any = anchor.graph.owning_module
        try:
            for part in str(w.target).split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return None
        if isinstance(obj, torch.Tensor) and obj.dim() == 5:
            return int(obj.size(1)) * int(conv["groups"])
    return None


def _channel_span_reason(node: fx.Node, anchor: fx.Node, conv: Dict[str, Any],
                         modules) -> Optional[str]:
    """Why an op over the channels (softmax(dim=1)) cannot join this site's kernel, or None:
    every kernel's tile must hold all C_out channels of a voxel (``_cuda.SOFTMAX_MAX_CHANNELS``)
    in one group."""
    from ._cuda import SOFTMAX_MAX_CHANNELS
    name = patterns.describe(node, modules)
    if conv["groups"] != 1:
        return (f"{name} spans the channels of a grouped ConvTranspose3d (groups="
                f"{conv['groups']}); the fused kernel's tile holds the channels of one group")
    c_out = _conv_channels(anchor, conv)
    if c_out is None:
        return f"{name}: C_out of the ConvTranspose3d is not known when tracing"
    if c_out > SOFTMAX_MAX_CHANNELS:
        return (f"{name} spans C_out={c_out} channels; the fused kernel holds at most "
                f"{SOFTMAX_MAX_CHANNELS} channels of a voxel in one tile")
    return None


def _w_span_reason(node: fx.Node, conv: Dict[str, Any], modules) -> Optional[str]:
    """Why an op over the W positions of a row (LayerNorm over the last dim) cannot join this
    site's kernel, or None: the kernel that holds whole W rows in its tile is the groups == 1
    implicit GEMM. (Whether a given output's rows fit in its tile is decided at run time, where
    the op falls back to cuDNN + PyTorch ops otherwise.)"""
    if conv["groups"] != 1:
        return (f"{patterns.describe(node, modules)} spans the W positions of a row of a grouped "
                f"ConvTranspose3d (groups={conv['groups']}); only the groups == 1 kernel holds "
                f"whole rows in its tile")
    return None


def _is_inplace(spec, bound, m) -> bool:
    return spec.inplace or bound.get("inplace") is True or (
        m is not None and patterns.module_inplace(m))


def _spec_of(node: fx.Node, modules):
    """(spec, bound arguments, module) of a fusable node, else None."""
    spec = patterns.lookup(node, modules)
    if spec is None:
        return None
    try:
        bound = spec.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    return spec, bound, modules.get(node.target) if node.op == "call_module" else None


def _alias_chain(t: fx.Node, modules) -> List[fx.Node]:
    """``t`` and the values it shares storage with through ops that return their input.

    Those ops are identities such as detach or eval-mode Dropout, and in-place ops (which return
    the tensor they changed). The last element is the value that owns the storage.
    """
    out = [t]
    while True:
        r = _spec_of(out[-1], modules)
        if r is None:
            return out
        spec, bound, m = r
        src = bound.get("input")
        if not (isinstance(src, fx.Node) and (spec.alias or _is_inplace(spec, bound, m))):
            return out
        out.append(src)


def _fold_inplace(gm: fx.GraphModule, modules) -> None:
    """Make later readers of a tensor changed in place read the in-place op's result.

    ``y.relu_(); return y + 1`` traces to ``relu_(y)`` with an unused result and ``add(y, 1)``;
    it computes the same as ``y = y.relu_(); return y + 1``, the form the matcher can fuse.
    Done only when it cannot change results: every other reader of ``y`` comes after the
    in-place op, and ``y`` shares its storage only with values that have no other reader,
    back to a value that owns its storage (a ConvTranspose3d or a fusable op's fresh result).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes):
        r = _spec_of(n, modules)
        if r is None or not _is_inplace(*r):
            continue
        t = r[1].get("input")
        if not isinstance(t, fx.Node):
            continue
        later = [u for u in t.users if u is not n]
        if not later or any(order[u] < order[n] for u in later):
            continue
        chain = _alias_chain(t, modules)
        if any(len(a.users) != 1 for a in chain[1:]):
            continue
        root = chain[-1]
        if not patterns.is_anchor(root, modules):
            rr = _spec_of(root, modules)
            if rr is None or rr[0].alias or _is_inplace(*rr):
                continue
        for u in later:
            u.replace_input_with(t, n)


def _ancestors(t: fx.Node, S: set) -> set:
    out, todo = {t}, [t]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in S and a not in out:
                out.add(a)
                todo.append(a)
    return out


def _outside_users(C: set, sink: fx.Node) -> Optional[Tuple[fx.Node, List[fx.Node]]]:
    for n in C:
        if n is sink:
            continue
        outs = [u for u in n.users if u not in C]
        if outs:
            return n, outs
    return None


def match(anchor: fx.Node, modules, config: Config) -> Match:
    """Grow the largest fusable epilogue DAG below ``anchor`` that ends in one node."""
    conv, why = _conv_args(anchor, modules)
    if conv is None:
        return Match(anchor, [anchor], None, {}, reason=why)
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    tainted = _downstream(anchor)
    S = {anchor}
    specs: Dict[fx.Node, Any] = {}
    rejected: Dict[fx.Node, str] = {}
    pcache: Dict[fx.Node, bool] = {}
    for n in sorted(tainted - {anchor}, key=order.__getitem__):
        ins = [a for a in n.all_input_nodes if a in tainted]
        if not all(a in S for a in ins):
            continue
        r = _candidate(n, S, tainted, modules, config, pcache)
        if not isinstance(r, str) and r[0].spans_channels:
            r = _channel_span_reason(n, anchor, conv, modules) or r
        if not isinstance(r, str) and r[0].spans_w:
            r = _w_span_reason(n, conv, modules) or r
        if isinstance(r, str):
            rejected[n] = r
        else:
            S.add(n)
            specs[n] = r
    # the largest valid chain: a sink whose in-chain ancestors feed only each other
    best, best_anc = anchor, {anchor}
    for t in sorted(S, key=order.__getitem__):
        anc = _ancestors(t, S)
        if _outside_users(anc, t) is None and len(anc) >= len(best_anc):
            best, best_anc = t, anc
    nodes = sorted(best_anc, key=order.__getitem__)
    # why the chain stops where it does
    users = list(best.users)
    if not users:
        stop = None
    elif len(users) > 1:
        stop = (f"the output of {_label(best, modules)} has {len(users)} users "
                f"({', '.join(_label(u, modules) for u in users)})")
    else:
        u = users[0]
        if u in rejected:
            stop = rejected[u]
        elif u in S:
            anc = _ancestors(u, S)
            o = _outside_users(anc, u)
            stop = (f"{patterns.describe(u, modules)} cannot join: intermediate "
                    f"{_label(o[0], modules)} has {len(o[1])} user(s) outside the chain" if o else
                    f"{patterns.describe(u, modules)} cannot join")
        elif u.op == "output":
            stop = None
        else:
            stop = _elementwise_reason(u, modules)
    return Match(anchor, nodes, stop, conv, specs={n: specs[n] for n in nodes[1:]})


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
class _Emitter:
    """Builds the program, scalar table and extra-tensor list of one site."""

    def __init__(self, fqn_of: Dict[int, str]):
        self.program: List[int] = []
        self.scalars: List[float] = []
        self.extras: List[Tuple[str, Any]] = []   # ("node", Node) or ("attr", fqn)
        self.values: Dict[fx.Node, int] = {}
        self._fqn_of = fqn_of

    def emit(self, opcode: Opcode, *fields: int) -> int:
        f = list(fields) + [-1] * (INSTR_WIDTH - 1 - len(fields))
        self.program += [int(opcode)] + [int(x) for x in f]
        return len(self.program) // INSTR_WIDTH

    def scalar(self, x) -> int:
        x = float(x)
        for i, s in enumerate(self.scalars):
            if s == x and str(s) == str(x):
                return i
        self.scalars.append(x)
        return len(self.scalars) - 1

    def tensor(self, t) -> int:
        key = ("node", t) if isinstance(t, fx.Node) else ("attr", self._fqn_of[id(t)])
        # BATCH_NORM needs its 2 or 4 tensors consecutive, so tensors are never de-duplicated
        self.extras.append(key)
        return len(self.extras) - 1

    def value(self, arg) -> int:
        if isinstance(arg, fx.Node):
            if arg in self.values:
                return self.values[arg]
            return self.emit(Opcode.LOAD_TENSOR, self.tensor(arg))
        return self.emit(Opcode.LOAD_SCALAR, self.scalar(arg))


def _encode(m: Match, fqn_of) -> _Emitter:
    e = _Emitter(fqn_of)
    e.values[m.anchor] = 0
    for n in m.nodes[1:]:
        spec, bound, mod = m.specs[n]
        v = spec.encode(e, bound, mod)
        if v is None:  # identity: the input value passes through
            v = e.values[bound["input"]]
        e.values[n] = v
    assert e.values[m.sink] == len(e.program) // INSTR_WIDTH, "sink is not the last value"
    return e


# --------------------------------------------------------------------------------------------
# The site module
# --------------------------------------------------------------------------------------------
class FusedSite(nn.Module):
    """Runs one fused site: ``torch.ops.ct3d.conv_transpose3d_epilogue`` with a fixed program.

    Holds no Parameters or buffers (so state_dict keys do not change); the tensors arrive as
    arguments from ``get_attr`` nodes of the original submodules. The modules whose mode matters
    (BatchNorm3d, Dropout) are referenced, not registered: when any is in training mode, or the
    input is not 5-D, the site runs the original ops unfused (``self.unfused``), so the optimized
    model follows ``train()`` / ``eval()`` like the original. ``output_size`` (keyword) is the
    ConvTranspose3d ``output_size`` when the model computes it at run time.

    Raises:
        ValueError, TypeError, RuntimeError: the fused op's argument errors, prefixed with the
            site's FQN.
    """

    def __init__(self, fqn: str, conv: Dict[str, Any], program: List[int], scalars: List[float],
                 mode_modules: Sequence[nn.Module], unfused: fx.GraphModule):
        super().__init__()
        self.fqn = fqn
        self.stride, self.padding = conv["stride"], conv["padding"]
        self.output_padding, self.dilation = conv["output_padding"], conv["dilation"]
        self.groups = conv["groups"]
        self.output_size = conv.get("output_size")
        self.program, self.scalars = list(program), list(scalars)
        # plain attributes (tuples are not registered as submodules)
        self._refs = (conv.get("module"), tuple(mode_modules), unfused)
        # the rewrite report's record of this site: the autotune's choices go to its
        # ``autotune`` list (at most _MAX_CHOICES, one per new call signature)
        self.record: Optional[SiteRecord] = None

    @property
    def unfused(self) -> fx.GraphModule:
        return self._refs[2]

    def extra_repr(self) -> str:
        from .ops import describe_program
        return f"site={self.fqn!r}, program=[{describe_program(self.program, self.scalars)}]"

    def forward(self, input, weight, bias, *extras, output_size=None):
        conv, mode_modules, unfused = self._refs
        if input.dim() != 5 or any(mm.training for mm in mode_modules):
            if output_size is not None:
                return unfused(input, weight, bias, *extras, output_size)
            return unfused(input, weight, bias, *extras)
        out_pad = self.output_padding
        size = self.output_size if output_size is None else output_size
        if input.size(1) != weight.size(0):
            raise ValueError(f"ct3d_fx site {self.fqn!r}: input has {input.size(1)} channels, "
                             f"expected {weight.size(0)}")
        try:
            if size is not None:
                k = list(weight.shape[2:])
                out_pad = conv._output_padding(input, size, self.stride, self.padding, k, 3,
                                               self.dilation)
            args = (input, weight, bias, self.stride, self.padding, out_pad, self.dilation,
                    self.groups, self.program, self.scalars, list(extras))
            decided = _cuda._decisions
            if _direct_call_ok(input, weight, bias, extras):
                out = _cuda.run(args)
            else:
                out = torch.ops.ct3d.conv_transpose3d_epilogue(*args)
            if _cuda._decisions != decided and self.record is not None:
                # this call was a new signature's first: the autotune chose for it
                if len(self.record.autotune) < _MAX_CHOICES:
                    self.record.autotune.append(_cuda._last_decision)
            return out
        except (ValueError, TypeError, RuntimeError) as e:
            if type(e) not in (ValueError, TypeError, RuntimeError):
                raise  # subclasses (torch.OutOfMemoryError, ...) keep their type and message
            raise type(e)(f"ct3d_fx site {self.fqn!r}: {e}") from e


_MAX_CHOICES = 64  # autotune choices a site's report record keeps

_fx_symbolic_tracing = getattr(fx._symbolic_trace, "is_fx_symbolic_tracing",
                               fx._symbolic_trace.is_fx_tracing)


def _direct_call_ok(input, weight, bias, extras) -> bool:
    """Whether a site may call the op's CUDA implementation (``_cuda.run``) directly instead of
    through the dispatcher: plain CUDA tensors, no gradient to record, no torch.compile or fx
    tracing, no dispatch or torch-function mode. The result is the same; the host time per call
    drops by about 40 us, which decides small models (a GAN generator at batch 1)."""
    if type(input) is not torch.Tensor or not input.is_cuda:  # (a Proxy while fx traces)
        return False
    tensors = (input, weight) + (() if bias is None else (bias,)) + tuple(extras)
    if any(type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling() or _fx_symbolic_tracing():
        return False
    return not (torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() > 0)


def _build_unfused(m: Match, e: _Emitter, root: nn.Module) -> fx.GraphModule:
    """A small GraphModule with the original ops of the site, inputs (input, weight, bias, *extras)."""
    g = fx.Graph()
    x = g.placeholder("input")
    w = g.placeholder("weight")
    b = g.placeholder("bias")
    ex = [g.placeholder(f"extra{i}") for i in range(len(e.extras))]
    env: Dict[fx.Node, fx.Node] = {}
    for (kind, key), ph in zip(e.extras, ex):
        if kind == "node":
            env.setdefault(key, ph)
    a = m.anchor
    if a.op == "call_module":
        c = m.conv
        osz = g.placeholder("output_size") if c.get("output_size_arg") is not None else \
            c.get("output_size")
        env[a] = g.call_module(a.target, (x,), {} if osz is None else {"output_size": osz})
    else:
        c = m.conv
        env[a] = g.call_function(F.conv_transpose3d, (x, w, b, c["stride"], c["padding"],
                                                      c["output_padding"], c["groups"],
                                                      c["dilation"]))
    for n in m.nodes[1:]:
        env[n] = g.node_copy(n, lambda v: env[v])
    g.output(env[m.sink])
    gm = fx.GraphModule(root, g, class_name="UnfusedSite")
    return gm


# --------------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------------
def _fqn_table(model: nn.Module) -> Dict[int, str]:
    out = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        out.setdefault(id(t), n)
    return out


def _mode_modules(m: Match, modules) -> List[nn.Module]:
    out = []
    for n in m.nodes[1:]:
        spec = m.specs[n][0]
        if spec.mode_dependent:
            out.append(modules[n.target])
    return out


def _rewrite(gm: fx.GraphModule, m: Match, e: _Emitter, site_name: str, fqn: str,
             sites: nn.Module, record: Optional[SiteRecord] = None) -> fx.Node:
    g = gm.graph
    modules = _modules(gm)
    sink = m.sink
    with g.inserting_before(sink):
        if m.conv["module"] is not None:
            cm = m.conv["module"]
            w = g.get_attr(f"{m.anchor.target}.weight")
            b = g.get_attr(f"{m.anchor.target}.bias") if cm.bias is not None else None
        else:
            w, b = m.conv["weight"], m.conv["bias"]
        extras = []
        for kind, key in e.extras:
            extras.append(key if kind == "node" else g.get_attr(key))
        site = FusedSite(fqn, m.conv, e.program, e.scalars, _mode_modules(m, modules),
                         _build_unfused(m, e, gm))
        site.record = record
        sites.add_module(site_name, site)
        osz = m.conv.get("output_size_arg")
        node = g.call_module(f"{_SITES}.{site_name}", (m.conv["input"], w, b, *extras),
                             {} if osz is None else {"output_size": osz})
    node.meta.update({k: v for k, v in sink.meta.items() if k in ("tensor_meta", "val")})
    sink.replace_all_uses_with(node)
    for n in reversed(m.nodes):
        g.erase_node(n)
    return node


# --------------------------------------------------------------------------------------------
# Spatial softmax after a site: view(n, c, -1) -> softmax(dim=2) -> view back [-> mul by weight]
# --------------------------------------------------------------------------------------------
_SOFTMAX_FNS = {F.softmax: False, torch.softmax: False, F.log_softmax: True,
                torch.log_softmax: True}


@dataclass
class SpatialTail:
    """The nodes of a spatial softmax on a site's output, replaced by one
    ``ct3d::spatial_softmax`` call (``nodes[-1]``'s users read its result)."""

    nodes: List[fx.Node]
    log: bool
    weight: Optional[fx.Node]
    desc: str


def _size_ref(n, y: fx.Node):
    """"all" when ``n`` is ``y.shape`` / ``y.size()``, i when it is ``y.shape[i]`` /
    ``y.size(i)``, else None."""
    if not isinstance(n, fx.Node):
        return None
    if (n.op == "call_function" and n.target is getattr and len(n.args) == 2
            and n.args[0] is y and n.args[1] == "shape"):
        return "all"
    if n.op == "call_method" and n.target == "size" and n.args and n.args[0] is y:
        if len(n.args) == 1 and not n.kwargs:
            return "all"
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return d if isinstance(d, int) and not isinstance(d, bool) else None
    if (n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2
            and _size_ref(n.args[0], y) == "all" and isinstance(n.args[1], int)
            and not isinstance(n.args[1], bool)):
        return n.args[1]
    return None


def _shape_args(n: fx.Node) -> Optional[tuple]:
    """The target shape of ``view``/``reshape`` (method or ``torch.reshape``) as a tuple whose
    items are ints or nodes (a single shape node stays one item), else None."""
    if n.kwargs:
        return None
    if n.op == "call_method" and n.target in ("view", "reshape"):
        dims = n.args[1:]
    elif n.op == "call_function" and n.target is torch.reshape and len(n.args) == 2:
        dims = n.args[1:]
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return tuple(dims)


def _flattens_spatial(v: fx.Node, y: fx.Node) -> bool:
    """``v`` is ``y.view(y.shape[0], y.shape[1], -1)`` (or reshape, flatten(2))."""
    if not v.args or v.args[0] is not y:
        return False
    if (v.op == "call_method" and v.target == "flatten") or (
            v.op == "call_function" and v.target is torch.flatten):
        def sig(input, start_dim=0, end_dim=-1):
            return start_dim, end_dim
        try:
            return sig(*v.args, **v.kwargs) == (2, -1)
        except TypeError:
            return False
    dims = _shape_args(v)
    return (dims is not None and len(dims) == 3 and _size_ref(dims[0], y) == 0
            and _size_ref(dims[1], y) == 1 and dims[2] == -1 and dims[0] is not dims[1])


def _softmax_over_last(s: fx.Node, v: fx.Node, modules) -> Optional[bool]:
    """log (True/False) when ``s`` is softmax / log_softmax of ``v`` over dim 2 (or -1) with no
    dtype, else None."""
    if s.op == "call_module":
        m = modules.get(s.target)
        if type(m) not in (nn.Softmax, nn.LogSoftmax) or len(s.args) != 1 or s.kwargs:
            return None
        ok = s.args[0] is v and m.dim in (2, -1)
        return isinstance(m, nn.LogSoftmax) if ok else None
    if s.op == "call_function" and s.target in _SOFTMAX_FNS:
        log = _SOFTMAX_FNS[s.target]
    elif s.op == "call_method" and s.target in ("softmax", "log_softmax"):
        log = s.target == "log_softmax"
    else:
        return None
    if len(s.args) > 2:
        return None

    def sig(input, dim=None, _stacklevel=3, dtype=None):
        return input, dim, dtype
    try:
        inp, dim, dtype = sig(*s.args, **s.kwargs)
    except TypeError:
        return None
    return log if inp is v and dim in (2, -1) and dtype is None else None


def _restores_shape(b: fx.Node, s: fx.Node, y: fx.Node) -> bool:
    """``b`` is ``s.view(y.shape)`` (reshape, view_as(y), or the 5 sizes of y one by one)."""
    if not b.args or b.args[0] is not s:
        return False
    if b.op == "call_method" and b.target in ("view_as", "reshape_as"):
        return len(b.args) == 2 and b.args[1] is y and not b.kwargs
    dims = _shape_args(b)
    if dims is None:
        return False
    if len(dims) == 1:
        return _size_ref(dims[0], y) == "all"
    return len(dims) == 5 and all(_size_ref(d, y) == i for i, d in enumerate(dims))


def _is_mul_by(u: fx.Node, b: fx.Node, pcache) -> Optional[fx.Node]:
    """The other operand when ``u`` is ``b * w`` (or ``w * b``) with ``w`` computed from
    parameters and buffers alone, else None."""
    if u.kwargs or len(u.args) != 2:
        return None
    if not ((u.op == "call_function" and u.target in (operator.mul, torch.mul)) or
            (u.op == "call_method" and u.target == "mul")):
        return None
    a, w = u.args
    if a is not b:
        if u.op == "call_method":
            return None
        a, w = w, a
    if a is not b or not isinstance(w, fx.Node) or w is b:
        return None
    return w if _param_derived(w, pcache) else None


def match_spatial_tail(y: fx.Node, modules, config: Config) -> Optional[SpatialTail]:
    """The spatial softmax that reads ``y`` (a site's result), or None."""
    if "spatial_softmax" not in config.families:
        return None
    for v in list(y.users):
        if len(v.users) != 1 or not _flattens_spatial(v, y):
            continue
        s = next(iter(v.users))
        log = _softmax_over_last(s, v, modules)
        if log is None or len(s.users) != 1:
            continue
        b = next(iter(s.users))
        if not _restores_shape(b, s, y):
            continue
        name = "log_softmax" if log else "softmax"
        nodes, weight = [v, s, b], None
        desc = f"view(n, c, -1) -> {name}(dim=2) -> view"
        if len(b.users) == 1:
            u = next(iter(b.users))
            weight = _is_mul_by(u, b, {})
            if weight is not None:
                nodes.append(u)
                desc += f" -> mul({weight.name})"
        return SpatialTail(nodes, log, weight, desc)
    return None


def _spatial_softmax_call(input, log, weight):
    """What the rewritten graph calls: ``ct3d::spatial_softmax``, through the dispatcher only
    when autograd, tracing or a mode needs it (see ``_direct_call_ok``)."""
    if _direct_call_ok(input, input, weight, ()):
        return _spatial.run(input, log, weight)
    return torch.ops.ct3d.spatial_softmax(input, log, weight)


def _rewrite_tail(gm: fx.GraphModule, fn, args: tuple, nodes: List[fx.Node]) -> None:
    """Replace ``nodes`` (a tail on a site's result) by one ``call_function`` of ``fn`` with
    ``args``; the users of ``nodes[-1]`` read its result."""
    g = gm.graph
    last = nodes[-1]
    with g.inserting_before(last):
        node = g.call_function(fn, args)
    node.meta.update({k: v for k, v in last.meta.items() if k in ("tensor_meta", "val")})
    last.replace_all_uses_with(node)
    for n in reversed(nodes):
        g.erase_node(n)


@dataclass
class PoolTail:
    """An average or max pool (and the activation after it) on a site's output, replaced by one
    ``pool_tail.call`` (``nodes[-1]``'s users read its result)."""

    nodes: List[fx.Node]
    kernel: Tuple[int, int, int]
    act: Optional[str]
    desc: str
    mode: str = "avg"  # or "max"


def _triple_of(v) -> Optional[Tuple[int, int, int]]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v, v)
    if (isinstance(v, (tuple, list)) and len(v) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        return tuple(v)
    return None


def _pool_call_args(p: fx.Node, y: fx.Node, sig) -> Optional[tuple]:
    """The arguments of the functional pool call ``p`` bound by ``sig`` (which returns input,
    kernel_size, stride, then the rest), without the input, with an omitted or empty stride
    replaced by the window; None when they do not bind or the input is not ``y``."""
    try:
        inp, k, st, *rest = sig(*p.args, **p.kwargs)
    except TypeError:
        return None
    if inp is not y:
        return None
    if st is None or (isinstance(st, (tuple, list)) and len(st) == 0):
        st = k
    return (k, st, *rest)


def _max_pool_window(p: fx.Node, y: fx.Node, modules) -> Optional[Tuple[int, int, int]]:
    """The window of ``p`` when it is ``max_pool3d(y)`` with stride equal to the window (each
    1-8), no padding, no dilation, floor mode and no indices, else None."""
    if p.op == "call_module":
        m = modules.get(p.target)
        if type(m) is not nn.MaxPool3d or p.args != (y,) or p.kwargs:
            return None
        k, st, pad, dil = m.kernel_size, m.stride, m.padding, m.dilation
        ceil, idx = m.ceil_mode, m.return_indices
    elif p.op == "call_function" and p.target in (F.max_pool3d, torch.max_pool3d):
        def sig(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False):
            return input, kernel_size, stride, padding, dilation, ceil_mode, return_indices
        bound = _pool_call_args(p, y, sig)
        if bound is None:
            return None
        k, st, pad, dil, ceil, idx = bound
    else:
        return None
    k3, st3, pad3, dil3 = _triple_of(k), _triple_of(st), _triple_of(pad), _triple_of(dil)
    if (k3 is None or k3 != st3 or pad3 != (0, 0, 0) or dil3 != (1, 1, 1) or ceil is not False
            or idx is not False or not all(1 <= x <= 8 for x in k3)):
        return None
    return k3


def _avg_pool_window(p: fx.Node, y: fx.Node, modules) -> Optional[Tuple[int, int, int]]:
    """The window of ``p`` when it is ``avg_pool3d(y)`` with stride equal to the window (each
    1-8), no padding, floor mode and no divisor_override, else None."""
    if p.op == "call_module":
        m = modules.get(p.target)
        if type(m) is not nn.AvgPool3d or p.args != (y,) or p.kwargs:
            return None
        k, st, pad = m.kernel_size, m.stride, m.padding
        ceil, div = m.ceil_mode, m.divisor_override
    elif p.op == "call_function" and p.target in (F.avg_pool3d, torch._C._nn.avg_pool3d):
        def sig(input, kernel_size, stride=None, padding=0, ceil_mode=False,
                count_include_pad=True, divisor_override=None):
            return input, kernel_size, stride, padding, ceil_mode, divisor_override
        bound = _pool_call_args(p, y, sig)
        if bound is None:
            return None
        k, st, pad, ceil, div = bound
    else:
        return None
    k3, st3, pad3 = _triple_of(k), _triple_of(st), _triple_of(pad)
    if (k3 is None or k3 != st3 or pad3 != (0, 0, 0) or ceil is not False or div is not None
            or not all(1 <= x <= 8 for x in k3)):
        return None
    return k3


_TAIL_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_TAIL_ACT_FNS = {torch.relu: "relu", F.relu: "relu", F.silu: "silu", torch.sigmoid: "sigmoid",
                 torch.tanh: "tanh", F.gelu: "gelu"}
_TAIL_ACT_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def _tail_activation(u: fx.Node, p: fx.Node, modules) -> Optional[str]:
    """The ``pool_tail.ACTIVATIONS`` key of ``u`` when it is an activation of ``p`` alone,
    else None."""
    if not u.args or u.args[0] is not p or len(u.args) > 1:
        return None
    if u.op == "call_module":
        m = modules.get(u.target)
        if u.kwargs:
            return None
        if type(m) is nn.GELU:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
        return _TAIL_ACT_MODULES.get(type(m))
    if u.op == "call_function" and u.target in _TAIL_ACT_FNS:
        name = _TAIL_ACT_FNS[u.target]
        kw = dict(u.kwargs)
        if name == "gelu":
            name = {"none": "gelu", "tanh": "gelu_tanh"}.get(kw.pop("approximate", "none"))
        elif u.target in (F.relu, F.silu):
            kw.pop("inplace", None)
        return name if not kw else None
    if u.op == "call_method" and u.target in _TAIL_ACT_METHODS and not u.kwargs:
        return _TAIL_ACT_METHODS[u.target]
    return None


def match_pool_tail(y: fx.Node, modules, config: Config) -> Optional[PoolTail]:
    """The average or max pool (and its activation) that reads ``y`` (a site's result), or
    None."""
    if "pool_tail" not in config.families:
        return None
    for p in list(y.users):
        mode, k = "avg", _avg_pool_window(p, y, modules)
        if k is None:
            mode, k = "max", _max_pool_window(p, y, modules)
        if k is None:
            continue
        nodes, act = [p], None
        desc = f"{mode}_pool3d({k[0] if len(set(k)) == 1 else k})"
        if len(p.users) == 1:
            u = next(iter(p.users))
            act = _tail_activation(u, p, modules)
            if act is not None:
                nodes.append(u)
                desc += f" -> {act}"
        return PoolTail(nodes, k, act, desc, mode)
    return None


# --------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm3d (and one activation) after a site: ct3d_fx.norm_tail
# --------------------------------------------------------------------------------------------
@dataclass
class NormTail:
    """A GroupNorm or InstanceNorm (no running statistics) on a site's output, and the
    activation after it, replaced by one ``norm_tail.call`` (``nodes[-1]``'s users read its
    result). ``weight`` / ``bias``: a node, None, or the dotted path of a module's parameter
    (made a ``get_attr`` by the rewrite). ``groups`` None: InstanceNorm (one group per
    channel)."""

    nodes: List[fx.Node]
    groups: Optional[int]
    weight: Any
    bias: Any
    eps: float
    act: Optional[str]
    alpha: float
    desc: str


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _norm_of(p: fx.Node, y: fx.Node, modules) -> Optional[tuple]:
    """(groups, weight, bias, eps) when ``p`` is GroupNorm or InstanceNorm without running
    statistics of ``y``, else None."""
    if p.op == "call_module":
        m = modules.get(p.target)
        if p.args != (y,) or p.kwargs:
            return None
        affine = (f"{p.target}.weight", f"{p.target}.bias")
        if type(m) is nn.GroupNorm:
            return (m.num_groups, *(affine if m.affine else (None, None)), float(m.eps))
        if type(m) is nn.InstanceNorm3d and not m.track_running_stats:
            return (None, *(affine if m.affine else (None, None)), float(m.eps))
        return None
    if p.op != "call_function":
        return None
    if p.target is F.group_norm:
        def sig(input, num_groups, weight=None, bias=None, eps=1e-5):
            return input, num_groups, weight, bias, eps
        try:
            inp, groups, w, b, eps = sig(*p.args, **p.kwargs)
        except TypeError:
            return None
        if not (isinstance(groups, int) and not isinstance(groups, bool)):
            return None
    elif p.target is F.instance_norm:
        def sig(input, running_mean=None, running_var=None, weight=None, bias=None,
                use_input_stats=True, momentum=0.1, eps=1e-5):
            return input, running_mean, running_var, weight, bias, use_input_stats, eps
        try:
            inp, rm, rv, w, b, use, eps = sig(*p.args, **p.kwargs)
        except TypeError:
            return None
        if rm is not None or rv is not None or use is not True:
            return None
        groups = None
    else:
        return None
    if inp is not y or not _is_number(eps) or any(
            t is not None and not isinstance(t, fx.Node) for t in (w, b)):
        return None
    return groups, w, b, float(eps)


def _norm_activation(u: fx.Node, p: fx.Node, modules) -> Optional[Tuple[str, float]]:
    """(``norm_tail.ACTIVATIONS`` key, LeakyReLU slope) when ``u`` is an activation of ``p``
    alone, else None."""
    act = _tail_activation(u, p, modules)
    if act is not None:
        return act, 0.01
    if not u.args or u.args[0] is not p:
        return None
    if u.op == "call_module":
        m = modules.get(u.target)
        if len(u.args) != 1 or u.kwargs:
            return None
        if type(m) is nn.Hardswish:
            return "hardswish", 0.01
        if type(m) is nn.LeakyReLU:
            return "leaky_relu", float(m.negative_slope)
        return None
    if u.op == "call_function" and u.target is F.hardswish:
        def sig(input, inplace=False):
            return input
    elif u.op == "call_function" and u.target is F.leaky_relu:
        def sig(input, negative_slope=0.01, inplace=False):
            return input, negative_slope
    else:
        return None
    try:
        bound = sig(*u.args, **u.kwargs)
    except TypeError:
        return None
    if u.target is F.hardswish:
        return "hardswish", 0.01
    slope = bound[1]
    return ("leaky_relu", float(slope)) if _is_number(slope) else None


def match_norm_tail(y: fx.Node, modules, config: Config) -> Optional[NormTail]:
    """The GroupNorm / InstanceNorm (and its activation) that reads ``y`` (a site's result),
    or None."""
    if "norm_tail" not in config.families:
        return None
    for p in list(y.users):
        norm = _norm_of(p, y, modules)
        if norm is None:
            continue
        groups, w, b, eps = norm
        nodes, act, alpha = [p], None, 0.01
        desc = "instance_norm" if groups is None else f"group_norm({groups})"
        if len(p.users) == 1:
            found = _norm_activation(next(iter(p.users)), p, modules)
            if found is not None:
                nodes.append(next(iter(p.users)))
                act, alpha = found
                desc += f" -> {act}" + (f"({alpha:g})" if act == "leaky_relu" else "")
        return NormTail(nodes, groups, w, b, eps, act, alpha, desc)
    return None


def _rewrite_norm_tail(gm: fx.GraphModule, node: fx.Node, t: NormTail) -> None:
    """Replace ``t.nodes`` by ``norm_tail.call(node, ...)``, the affine parameters of a module
    read by ``get_attr``."""
    affine = []
    with gm.graph.inserting_before(t.nodes[-1]):
        for v in (t.weight, t.bias):
            affine.append(gm.graph.get_attr(v) if isinstance(v, str) else v)
    _rewrite_tail(gm, _norm_tail.call, (node, t.groups, *affine, t.eps, t.act, t.alpha),
                  t.nodes)


def _finish(gm: fx.GraphModule, model: nn.Module, sites: nn.Module) -> fx.GraphModule:
    """Make ``gm`` share every submodule, Parameter and buffer of ``model`` at its FQN."""
    gm.graph.lint()
    out = fx.GraphModule(gm, gm.graph, class_name=f"Optimized{type(model).__name__}")
    # root-level attributes that are not state (tensor constants created by tracing) stay plain
    plain = {k: v for k, v in out._buffers.items() if k not in model._buffers}
    out._modules = collections.OrderedDict(model._modules)   # a copy: it gains _ct3d_sites
    # the same dicts, not copies: .to()/.float() put new buffer tensors in place, in both
    out._parameters = model._parameters
    out._buffers = model._buffers
    out._non_persistent_buffers_set = model._non_persistent_buffers_set
    for k, v in plain.items():
        object.__setattr__(out, k, v)
    if len(sites._modules):
        out._modules[_SITES] = sites
    out.training = model.training
    out.recompile()
    return out


# --------------------------------------------------------------------------------------------
# Shape propagation and verification
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _preserved_state(model: nn.Module):
    """Restore buffers (BatchNorm statistics) and the RNG after running the model."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=[]):
        yield
    with torch.no_grad():
        for b, s in saved:
            b.copy_(s)


def _as_tuple(example_inputs) -> Optional[tuple]:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _fresh(inputs) -> tuple:
    """Copies of the tensors in ``inputs``: a model that changes its inputs in place must see
    the same values at every run, and the caller's example inputs must not change."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)


def _run(model, inputs, seed=0):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    with torch.no_grad():
        return model(*_fresh(inputs))


def _flat_tensors(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat_tensors(v)]
    return []


def _max_rel_err(out, ref) -> float:
    a, b = _flat_tensors(out), _flat_tensors(ref)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        if x.numel() == 0:
            continue
        x, y = x.double(), y.double()
        if not torch.isfinite(x).eq(torch.isfinite(y)).all():
            return float("inf")
        fin = torch.isfinite(y)
        d = (x[fin] - y[fin]).abs().max().item() if fin.any() else 0.0
        s = y[fin].abs().max().item() if fin.any() else 0.0
        worst = max(worst, d / max(s, 1e-30))
    return worst


def _default_tol(inputs, model) -> float:
    dt = None
    for t in _flat_tensors(list(inputs)) + list(model.parameters()):
        if t.is_floating_point():
            dt = t.dtype
            break
    if dt == torch.float64:
        return 1e-9
    if dt in (torch.float16, torch.bfloat16):
        return 5e-2
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and torch.backends.cudnn.allow_tf32:
        return 1e-2
    return 1e-4


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def _shape_meta(gm: fx.GraphModule, inputs) -> None:
    from torch.fx.passes.shape_prop import ShapeProp
    with _preserved_state(gm), torch.no_grad():
        ShapeProp(gm).propagate(*_fresh(inputs))


def _meta_of(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None, None
    return list(tm.shape), str(tm.dtype)


def _implementation(model: nn.Module, dtype: Optional[str]) -> str:
    from . import _build
    dev = None
    for p in model.parameters():
        dev = p.device
        break
    dev = dev or torch.device("cpu")
    name = getattr(_build, "implementation_name", None)
    if name is not None:
        dt = getattr(torch, dtype.split(".")[-1]) if dtype else None
        return name(dev, dt)
    return "fused CUDA kernel" if dev.type == "cuda" else "reference (CPU)"


def _process(model: nn.Module, inputs, config: Config, prefix: str, rewrite: bool,
             rep: RewriteReport) -> Optional[fx.GraphModule]:
    """Trace ``model``, match and (if ``rewrite``) rewrite every site. None when untraceable."""
    gm = _trace(model)
    if inputs is not None:
        try:
            _shape_meta(gm, inputs)
        except Exception as e:  # shape propagation is informative only
            rep.notes.append(f"{prefix or '<root>'}: shape propagation failed: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    modules = _modules(gm)
    fqn_of = _fqn_table(model)
    _fold_inplace(gm, modules)
    anchors = [n for n in gm.graph.nodes if patterns.is_anchor(n, modules)]
    sites = nn.Module()
    if rewrite:
        gm.add_module(_SITES, sites)
    used = set()
    for i, a in enumerate(anchors):
        fqn = _site_fqn(a)
        full = f"{prefix}.{fqn}" if prefix else fqn
        kind = "module" if a.op == "call_module" else "function"
        mod = modules.get(a.target) if kind == "module" else None
        in_shape = out_shape = dtype = None
        arg0 = a.args[0] if a.args else None
        if isinstance(arg0, fx.Node):
            in_shape, dtype = _meta_of(arg0)
        rec = SiteRecord(fqn=full, kind=kind, chain=[_short(a, modules)], input_shape=in_shape,
                         dtype=dtype)
        rep.sites.append(rec)
        if config.filter_fn is not None and not config.filter_fn(mod, full):
            rec.status, rec.reason = "skipped", "Config.filter_fn returned False"
            rec.implementation = "original (unfused)"
            rec.output_shape = _meta_of(a)[0]
            continue
        m = match(a, _modules(gm), config)
        if m.reason is not None:
            rec.status, rec.reason = "skipped", m.reason
            rec.implementation = "original (unfused)"
            rec.output_shape = _meta_of(a)[0]
            continue
        rec.chain = [_short(n, modules) for n in m.nodes]
        rec.stop = m.stop
        rec.output_shape = _meta_of(m.sink)[0]
        rec.ops_fused = len(m.nodes) - 1
        rec.status = "fused"
        rec.implementation = _implementation(model, dtype)
        try:
            e = _encode(m, fqn_of)
        except KeyError as ex:  # a tensor we cannot name (not a parameter/buffer of the model)
            rec.status, rec.reason = "skipped", f"cannot name tensor for get_attr: {ex}"
            rec.implementation = "original (unfused)"
            continue
        rec.program = e.program
        rec.scalars = e.scalars
        tail = match_spatial_tail(m.sink, modules, config)
        ptail = None if tail is not None else match_pool_tail(m.sink, modules, config)
        ntail = (None if tail is not None or ptail is not None
                 else match_norm_tail(m.sink, modules, config))
        if tail is not None:
            rec.then = f"{tail.desc}: ct3d spatial_softmax kernel"
        elif ptail is not None:
            rec.then = f"{ptail.desc}: ct3d pooled tail kernel"
        elif ntail is not None:
            rec.then = f"{ntail.desc}: ct3d norm tail kernels"
        if rewrite:
            name = fqn.replace(".", "_") or f"site{i}"
            while name in used:
                name += "_"
            used.add(name)
            node = _rewrite(gm, m, e, name, full, sites, rec)
            if tail is not None:
                _rewrite_tail(gm, _spatial_softmax_call, (node, tail.log, tail.weight),
                              tail.nodes)
            elif ptail is not None:
                _rewrite_tail(gm, _pool_tail.call, (node, ptail.kernel, ptail.act, ptail.mode),
                              ptail.nodes)
            elif ntail is not None:
                _rewrite_norm_tail(gm, node, ntail)
    if not rewrite:
        return gm
    return _finish(gm, model, sites)


def _has_anchor_module(m: nn.Module) -> bool:
    return any(isinstance(x, nn.ConvTranspose3d) for x in m.modules())


def _capture_inputs(model: nn.Module, inputs) -> Dict[str, tuple]:
    """Inputs each submodule saw on its first call (for shape propagation of submodules)."""
    seen: Dict[str, tuple] = {}
    hooks = []
    for name, sub in model.named_modules():
        if not name:
            continue

        def hook(mod, args, _name=name):
            if _name not in seen:
                seen[_name] = _fresh(args)
        hooks.append(sub.register_forward_pre_hook(hook))
    try:
        with _preserved_state(model):
            _run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _walk(module: nn.Module, inputs, config: Config, rewrite: bool, rep: RewriteReport,
          prefix: str, captured: Optional[Dict[str, tuple]], replaced: list, done: set) -> None:
    """Optimize ``module`` in place when it traces, else each of its children (recursively)."""
    if id(module) in done:  # one module object under two names: optimized once
        return
    done.add(id(module))
    try:
        gm = _process(module, inputs, config, prefix, rewrite, rep)
    except Untraceable as e:
        rep.untraced.append({"fqn": prefix, "reason": str(e)})
    else:
        if rewrite and _any_fused(rep, prefix):
            _install(module, gm, replaced)
        return
    for name, child in module.named_children():
        if not _has_anchor_module(child) and not _maybe_functional(child):
            continue
        path = f"{prefix}.{name}"
        sub_inputs = captured.get(path) if captured is not None else None
        _walk(child, sub_inputs, config, rewrite, rep, path, captured, replaced, done)


def _install(module: nn.Module, gm: fx.GraphModule, replaced: list) -> None:
    """Make ``gm`` (the optimized ``module``) the forward of ``module`` itself.

    The module object stays where it is, with its class, attributes, methods, hooks and
    submodules, so the untraced code around it (which may index a Sequential or read an
    attribute) runs unchanged. ``gm`` shares every submodule, Parameter and buffer with it.
    """
    replaced.append((module, module.__dict__.get("forward")))
    module.forward = gm.forward


def _uninstall(replaced: list) -> None:
    for module, previous in reversed(replaced):
        if previous is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = previous
    replaced.clear()


def _maybe_functional(m: nn.Module) -> bool:
    # Functional conv_transpose3d calls are invisible without tracing; try children with params.
    return any(p.dim() == 5 for p in m.parameters())


def _any_fused(rep: RewriteReport, path: str) -> bool:
    return any(s.status == "fused" and (s.fqn == path or s.fqn.startswith(path + "."))
               for s in rep.sites)


def _analyze(model: nn.Module, example_inputs, config: Optional[Config], rewrite: bool):
    config = config or Config()
    inputs = _as_tuple(example_inputs)
    rep = RewriteReport(model=type(model).__name__)
    replaced: list = []
    try:
        result = _process(model, inputs, config, "", rewrite, rep)
    except Untraceable as e:
        rep.untraced.append({"fqn": "<root>", "reason": str(e)})
        captured = _capture_inputs(model, inputs) if inputs is not None else None
        done = {id(model)}
        for name, child in model.named_children():
            if not _has_anchor_module(child) and not _maybe_functional(child):
                continue
            sub_inputs = captured.get(name) if captured is not None else None
            _walk(child, sub_inputs, config, rewrite, rep, name, captured, replaced, done)
        result = model
    return result, rep, replaced


def optimize(model: nn.Module, example_inputs=None, *, config: Optional[Config] = None):
    """Fuse every ConvTranspose3d and the elementwise ops after it into one op per site.

    Args:
        model: any ``nn.Module``. Put it in eval mode first for BatchNorm3d/Dropout to fuse.
        example_inputs: optional tensor or tuple of tensors, the model's positional inputs
            (any shape, dtype and device the model takes). Enables shape propagation in the report
            and verification (optimized vs original on these inputs).
        config: a :class:`ct3d_fx.Config`.

    Returns:
        A ``torch.fx.GraphModule`` with the model's forward signature, sharing every submodule,
        Parameter and buffer with ``model`` (same objects, same FQNs; ``state_dict()`` keys are
        equal), with ``ct3d_report`` set. If ``model`` cannot be traced as a whole, the largest
        traceable submodules are optimized *in place* (each keeps its object, class and FQN;
        its ``forward`` becomes the optimized graph's) and ``model`` itself is returned (with
        ``ct3d_report`` set). With ``config.on_verify_failure ==
        "keep_original"``, a rewrite that changes results is undone and ``model`` is returned.

    Raises:
        VerificationError: with example_inputs and ``on_verify_failure == "raise"``, when the
            optimized model's max relative error (max |opt - orig| / max |orig|) exceeds
            ``config.verify_tol``.

    Limitations:
        - Models that ``torch.fx.symbolic_trace`` cannot trace are optimized per submodule.
        - BatchNorm3d in training mode, training-mode Dropout, and ops outside the supported
          table end a chain (the report says which and why).
        - Module hyperparameters (stride, eps, negative_slope, ...) are read once; parameters and
          buffers (weights, BatchNorm statistics) are read at every call.
    """
    config = config or Config()
    inputs = _as_tuple(example_inputs)
    ref = None
    if inputs is not None and config.verify:
        with _preserved_state(model):
            ref = _run(model, inputs)
    result, rep, replaced = _analyze(model, inputs, config, rewrite=True)
    if ref is not None and rep.totals()["fused"]:
        with _preserved_state(model):
            out = _run(result, inputs)
        tol = config.verify_tol if config.verify_tol is not None else _default_tol(inputs, model)
        err = _max_rel_err(out, ref)
        rep.verification = {"max_rel_err": err, "tol": tol, "passed": err <= tol}
        if err > tol:
            msg = (f"ct3d_fx: the optimized {type(model).__name__} differs from the original on "
                   f"example_inputs: max relative error {err:.3g} > verify_tol {tol:.3g} "
                   f"(the traced graph may not compute what eager does, e.g. Python control "
                   f"flow on tensors)")
            _uninstall(replaced)
            if config.on_verify_failure == "raise":
                raise VerificationError(msg)
            for s in rep.sites:
                if s.status == "fused":
                    s.status, s.reason = "refused", f"verification failed: max relative error " \
                                                    f"{err:.3g} > {tol:.3g}"
                    s.implementation = "original (unfused)"
            result = model
    result.ct3d_report = rep
    return result


def explain(model: nn.Module, example_inputs=None, *, config: Optional[Config] = None
            ) -> RewriteReport:
    """The report :func:`optimize` would produce, without rewriting anything.

    Args/Raises: as :func:`optimize` (no verification is run).
    """
    _, rep, _ = _analyze(model, _as_tuple(example_inputs), config, rewrite=False)
    return rep


def report(model: nn.Module) -> RewriteReport:
    """The :class:`RewriteReport` of a module returned by :func:`optimize`.

    Raises:
        ValueError: when ``model`` was not produced by :func:`optimize`.
    """
    rep = getattr(model, "ct3d_report", None)
    if rep is None:
        raise ValueError(f"{type(model).__name__} has no ct3d_report: pass a module returned by "
                         f"ct3d_fx.optimize")
    return rep
