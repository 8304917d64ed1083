"""RewriteReport: what the pass fused, with what implementation, and why the rest was left alone."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from tabulate import tabulate

__all__ = ["RewriteReport", "SiteRecord", "AUTOTUNE_CHOICES"]


@dataclass
class SiteRecord:
    """One ConvTranspose3d site.

    ``status`` is "fused" (replaced by one fused op), "skipped" (left alone: ``reason``) or
    "refused" (rewrite undone because verification failed: ``reason``). ``chain`` lists the
    fused ops, conv first; ``stop`` says why the epilogue ends there. Shapes are lists of ints
    (NCDHW order) and ``dtype`` a string, when example inputs were given.
    """

    fqn: str
    kind: str                       # "module" | "function"
    chain: List[str]
    status: str = "fused"
    implementation: str = ""
    stop: Optional[str] = None
    reason: Optional[str] = None
    input_shape: Optional[List[int]] = None
    output_shape: Optional[List[int]] = None
    dtype: Optional[str] = None
    ops_fused: int = 0
    then: Optional[str] = None      # what runs on the result next (the spatial softmax kernel)
    # the per-shape autotune's choices for this site so far, in the order they were made (one per
    # new call signature; filled while the optimized model runs on CUDA): AUTOTUNE_CHOICES keys
    autotune: List[str] = field(default_factory=list)
    program: List[int] = field(default_factory=list, repr=False)
    scalars: List[float] = field(default_factory=list, repr=False)


#: What each autotune choice runs (ct3d_fx/_cuda.py run()).
AUTOTUNE_CHOICES = {
    "fused": "the fused kernel",
    "reference": "cuDNN + PyTorch epilogue ops",
    "cudnn_channels_last": "cuDNN on channels_last_3d copies + PyTorch epilogue ops",
    "cudnn_channels_last_pass": "cuDNN on channels_last_3d copies + ct3d epilogue pass",
    "cudnn_pass": "cuDNN + ct3d epilogue pass",
    "subpixel": "cuDNN conv3d over the output phases (sub-pixel form) + PyTorch epilogue ops",
}


def _implementation(s: "SiteRecord") -> str:
    """The implementation column: the site's kernel, and where the autotune chose otherwise for
    some call signature, what it chose."""
    other = [c for c in dict.fromkeys(s.autotune) if c != "fused"]
    if not other:
        return s.implementation
    what = "; ".join(AUTOTUNE_CHOICES.get(c, c) for c in other)
    n = len(s.autotune)
    return (f"{s.implementation}; autotuned to {what} "
            f"({n - s.autotune.count('fused')} of {n} shape(s))")


def _shape(s) -> str:
    return "-" if s is None else "x".join(str(d) for d in s)


@dataclass
class RewriteReport:
    """The rewrite report of :func:`ct3d_fx.optimize` / :func:`ct3d_fx.explain`.

    ``print(report)`` shows one table row per site, then the parts that could not be traced,
    then totals. ``to_dict()`` gives the same as plain data; ``to_markdown()`` a Markdown table.
    """

    model: str
    sites: List[SiteRecord] = field(default_factory=list)
    untraced: List[Dict[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    verification: Optional[Dict[str, Any]] = None

    def totals(self) -> Dict[str, int]:
        st = [s.status for s in self.sites]
        return {"sites": len(st), "fused": st.count("fused"), "skipped": st.count("skipped"),
                "refused": st.count("refused"),
                "ops_fused": sum(s.ops_fused for s in self.sites if s.status == "fused")}

    def to_dict(self) -> Dict[str, Any]:
        sites = []
        for s in self.sites:
            d = asdict(s)
            d.pop("program")
            d.pop("scalars")
            sites.append(d)
        return {"model": self.model, "sites": sites, "untraced": list(self.untraced),
                "notes": list(self.notes), "verification": self.verification,
                "totals": self.totals()}

    def _rows(self):
        rows = []
        for s in self.sites:
            note = s.reason if s.status != "fused" else (f"stopped: {s.stop}" if s.stop else "")
            if s.status == "fused" and s.then:
                note = f"{note}; then {s.then}" if note else f"then {s.then}"
            rows.append([s.fqn, " -> ".join(s.chain), _shape(s.input_shape),
                         _shape(s.output_shape), s.dtype.replace("torch.", "") if s.dtype else "-",
                         s.status, _implementation(s), note])
        return rows

    _HEAD = ["site", "chain", "input", "output", "dtype", "status", "implementation",
             "why it stops / why not fused"]

    def _tail(self) -> List[str]:
        t = self.totals()
        lines = [f"{t['sites']} site(s): {t['fused']} fused ({t['ops_fused']} epilogue op(s)), "
                 f"{t['skipped']} skipped, {t['refused']} refused"]
        for u in self.untraced:
            lines.append(f"not traced: {u['fqn']}: {u['reason']}")
        for n in self.notes:
            lines.append(f"note: {n}")
        if self.verification:
            v = self.verification
            lines.append(f"verification: max relative error {v['max_rel_err']:.3g} "
                         f"(tolerance {v['tol']:.3g}): {'passed' if v['passed'] else 'FAILED'}")
        return lines

    def __str__(self) -> str:
        head = f"ct3d_fx rewrite report for {self.model}"
        table = tabulate(self._rows(), headers=self._HEAD, tablefmt="simple") if self.sites \
            else "(no ConvTranspose3d site found)"
        return "\n".join([head, table, *self._tail()])

    def to_markdown(self) -> str:
        table = tabulate(self._rows(), headers=self._HEAD, tablefmt="github") if self.sites \
            else "_no ConvTranspose3d site found_"
        return "\n".join([f"### ct3d_fx rewrite report for {self.model}", "", table, "",
                          *[f"- {x}" for x in self._tail()]])
