"""The rewrite report: the printed table, to_dict, to_markdown, and explain() changing nothing."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ct3d_fx
from conftest import randn, randomize_


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose3d(4, 3, 2, stride=2), nn.BatchNorm3d(3),
                                nn.Dropout(0.1), nn.PReLU())
        self.mid = nn.ConvTranspose3d(3, 3, 3, padding=1)
        self.final = nn.ConvTranspose3d(3, 2, 2, stride=2)

    def forward(self, x, skip):
        y = self.up(x)
        y = F.relu(self.mid(y) + skip)
        return torch.softmax(self.final(y), dim=1)


def optimized(dtype=torch.float64):
    m = randomize_(Decoder()).to(dtype).eval()
    xs = (randn(2, 4, 2, 3, 2, dtype=dtype), randn(2, 3, 4, 6, 4, dtype=dtype, seed=2))
    return m, xs, ct3d_fx.optimize(m, xs)


SITE_KEYS = {"fqn", "kind", "chain", "status", "implementation", "autotune", "stop", "reason",
             "input_shape", "output_shape", "dtype", "ops_fused", "then"}


def test_report_rows():
    m, xs, opt = optimized()
    rep = ct3d_fx.report(opt)
    assert rep is opt.ct3d_report
    up, mid, final = rep.sites
    assert up.chain == ["ConvTranspose3d", "BatchNorm3d", "Dropout", "PReLU"]
    assert (up.input_shape, up.output_shape, up.dtype) == ([2, 4, 2, 3, 2], [2, 3, 4, 6, 4],
                                                          "torch.float64")
    assert up.stop == "feeds another ConvTranspose3d (mid)"
    assert mid.chain == ["ConvTranspose3d", "add", "relu"] and mid.ops_fused == 2
    # the segmentation head's softmax over the 2 class channels joins the fused op
    assert final.chain == ["ConvTranspose3d", "softmax"] and final.ops_fused == 1
    assert final.stop == "the result is a graph output"
    assert final.output_shape == [2, 2, 8, 12, 8]
    assert all(s.implementation and "reference" in s.implementation for s in rep.sites)
    assert rep.totals() == {"sites": 3, "fused": 3, "skipped": 0, "refused": 0, "ops_fused": 6}
    assert rep.verification["passed"] is True and rep.verification["max_rel_err"] <= 1e-9


def test_report_str():
    _, _, opt = optimized()
    text = str(opt.ct3d_report)
    lines = text.splitlines()
    assert lines[0] == "ct3d_fx rewrite report for Decoder"
    head = lines[1].split()
    assert head[:6] == ["site", "chain", "input", "output", "dtype", "status"]
    assert "ConvTranspose3d -> BatchNorm3d -> Dropout -> PReLU" in text
    assert "2x4x2x3x2" in text and "2x2x8x12x8" in text and "float64" in text
    assert "ConvTranspose3d -> softmax" in text
    assert "stopped: feeds another ConvTranspose3d (mid)" in text
    assert "3 site(s): 3 fused (6 epilogue op(s)), 0 skipped, 0 refused" in text
    assert "verification: max relative error" in text and "passed" in text
    row = next(line for line in lines if line.startswith("mid "))
    assert "ConvTranspose3d -> add -> relu" in row and "fused" in row


def test_report_to_dict_and_json():
    _, _, opt = optimized(torch.float32)
    d = opt.ct3d_report.to_dict()
    assert set(d) == {"model", "sites", "untraced", "notes", "verification", "totals"}
    assert d["model"] == "Decoder" and d["untraced"] == [] and d["notes"] == []
    assert [set(s) for s in d["sites"]] == [SITE_KEYS] * 3
    assert d["sites"][0]["dtype"] == "torch.float32"
    assert d["totals"]["fused"] == 3
    assert json.loads(json.dumps(d)) == d


def test_report_to_markdown():
    _, _, opt = optimized()
    md = opt.ct3d_report.to_markdown()
    lines = md.splitlines()
    assert lines[0] == "### ct3d_fx rewrite report for Decoder"
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 3                     # header, separator, one row per site
    assert table[0].startswith("| site") and set(table[1]) <= set("|-: ")
    assert "| up.0 " in md and "ConvTranspose3d -> add -> relu" in md
    assert "- 3 site(s): 3 fused (6 epilogue op(s)), 0 skipped, 0 refused" in md


def test_report_skipped_site_and_reason():
    m = randomize_(Decoder()).double().eval()
    xs = (randn(2, 4, 2, 3, 2), randn(2, 3, 4, 6, 4, seed=2))
    opt = ct3d_fx.optimize(m, xs, config=ct3d_fx.Config(filter_fn=lambda mod, fqn: fqn != "mid"))
    rep = opt.ct3d_report
    assert [s.status for s in rep.sites] == ["fused", "skipped", "fused"]
    assert rep.sites[1].reason == "Config.filter_fn returned False"
    assert rep.sites[1].output_shape == [2, 3, 4, 6, 4]
    assert "Config.filter_fn returned False" in str(rep)
    assert "2 fused" in str(rep) and "1 skipped" in str(rep)


def test_report_without_sites():
    m = nn.Sequential(nn.Conv3d(2, 2, 1), nn.ReLU())
    opt = ct3d_fx.optimize(m, (randn(1, 2, 2, 2, 2).float(),))
    rep = opt.ct3d_report
    assert rep.sites == [] and rep.verification is None
    assert "(no ConvTranspose3d site found)" in str(rep)
    assert "_no ConvTranspose3d site found_" in rep.to_markdown()
    assert "0 site(s): 0 fused" in str(rep)


def test_report_of_a_module_not_from_optimize():
    with pytest.raises(ValueError, match="Decoder has no ct3d_report: pass a module returned by "
                                         "ct3d_fx.optimize"):
        ct3d_fx.report(Decoder())


def test_report_shape_propagation_failure_is_a_note():
    m = randomize_(Decoder()).double().eval()
    bad = (randn(2, 4, 2, 3, 2), randn(2, 3, 5, 5, 5, seed=2))   # skip does not broadcast
    rep = ct3d_fx.explain(m, bad)
    assert len(rep.notes) == 1 and "shape propagation failed: RuntimeError" in rep.notes[0]
    assert rep.sites[0].output_shape == [2, 3, 4, 6, 4]     # ran before the failing add
    assert rep.sites[2].input_shape is None and rep.sites[2].output_shape is None
    assert "note: <root>: shape propagation failed" in str(rep)


# --------------------------------------------------------------------------------------------
# explain()
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_inputs", [True, False], ids=["inputs", "no-inputs"])
def test_explain_matches_optimize_and_changes_nothing(with_inputs):
    m = randomize_(Decoder()).double().eval()
    xs = (randn(2, 4, 2, 3, 2), randn(2, 3, 4, 6, 4, seed=2))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    attrs = set(vars(m))
    modules = dict(m.named_modules())
    with torch.no_grad():
        ref = m(*xs).clone()
    rep = ct3d_fx.explain(m, xs if with_inputs else None)
    assert isinstance(rep, ct3d_fx.RewriteReport)
    assert set(vars(m)) == attrs and not hasattr(m, "ct3d_report")
    assert dict(m.named_modules()) == modules
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=lambda s: f"{k}: {s}")
    with torch.no_grad():
        torch.testing.assert_close(m(*xs), ref, rtol=0, atol=0)
    assert rep.verification is None
    opt = ct3d_fx.optimize(m, xs)
    want = opt.ct3d_report
    assert [(s.fqn, s.chain, s.status, s.stop) for s in rep.sites] == \
        [(s.fqn, s.chain, s.status, s.stop) for s in want.sites]
    if with_inputs:
        assert [s.output_shape for s in rep.sites] == [s.output_shape for s in want.sites]
    else:
        assert all(s.input_shape is None and s.output_shape is None for s in rep.sites)
        assert "-" in str(rep).splitlines()[3].split()


# --------------------------------------------------------------------------------------------
# LayerNorm sites in the report
# --------------------------------------------------------------------------------------------
class _LNNet(nn.Module):
    """Three sites: LayerNorm over W fused; over (H, W) not; after a grouped conv not."""

    def __init__(self):
        super().__init__()
        self.a = nn.ConvTranspose3d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.ln_a = nn.LayerNorm(6)
        self.b = nn.ConvTranspose3d(4, 4, 3, padding=1)
        self.ln_b = nn.LayerNorm((8, 6))
        self.c = nn.ConvTranspose3d(4, 4, 3, padding=1, groups=2)
        self.ln_c = nn.LayerNorm(6, bias=False)

    def forward(self, x):
        y = F.relu(self.ln_a(self.a(x)))
        y = F.layer_norm(self.b(y), (8, 6), self.ln_b.weight, self.ln_b.bias)
        return self.ln_c(self.c(y) + 1.0)


def test_report_layer_norm_sites():
    m = randomize_(_LNNet()).double().eval()
    x = randn(2, 4, 2, 4, 3)
    opt = ct3d_fx.optimize(m, (x,))
    a, b, c = opt.ct3d_report.sites
    assert [s.status for s in (a, b, c)] == ["fused"] * 3
    assert a.chain == ["ConvTranspose3d", "LayerNorm", "relu"] and a.ops_fused == 2
    assert b.chain == ["ConvTranspose3d"]
    assert b.stop == ("layer_norm over normalized_shape=(8, 6) (2 dims) is not fused: only a "
                      "LayerNorm over the last dimension (W) is")
    assert c.chain == ["ConvTranspose3d", "add"]
    assert c.stop == ("LayerNorm spans the W positions of a row of a grouped ConvTranspose3d "
                      "(groups=2); only the groups == 1 kernel holds whole rows in its tile")
    text = str(opt.ct3d_report)
    assert "ConvTranspose3d -> LayerNorm -> relu" in text and "(2 dims) is not fused" in text
    from ct3d_fx.ops import describe_program
    assert describe_program(a.program, a.scalars) == \
        "v1=LAYER_NORM(v0, t0, t1, 1e-05, 6); v2=RELU(v1)"
    assert opt.ct3d_report.verification["passed"] is True


def test_report_shows_the_autotune_choices(monkeypatch):
    """A site's call that makes an autotune decision (a new signature on CUDA) records it in the
    report: to_dict()'s "autotune" and, where it is not the fused kernel, the implementation
    column. Simulated on the CPU: the site's direct call path with a stand-in for _cuda.run that
    decides like the autotune does."""
    from ct3d_fx import _cuda, fuse, ops

    model, xs, opt = optimized(torch.float32)
    xs = tuple(t.float() for t in xs)
    choices = iter(["cudnn_channels_last_pass", "fused", "reference"])

    def run(args):
        _cuda._decisions += 1
        _cuda._last_decision = next(choices)
        return ops.reference(*args)

    monkeypatch.setattr(fuse, "_direct_call_ok", lambda *a: True)
    monkeypatch.setattr(_cuda, "run", run)
    monkeypatch.setattr(_cuda, "_decisions", 0)
    with torch.no_grad():
        opt(*xs)
    rep = opt.ct3d_report
    assert [s["autotune"] for s in rep.to_dict()["sites"]] == [
        ["cudnn_channels_last_pass"], ["fused"], ["reference"]]
    text = str(rep)
    assert "autotuned to cuDNN on channels_last_3d copies + ct3d epilogue pass (1 of 1 shape(s))" \
        in text
    assert "autotuned to cuDNN + PyTorch epilogue ops" in text
    assert text.count("autotuned") == 2  # the site that kept the fused kernel says nothing more
    # calls that decide nothing (known signatures) add nothing
    monkeypatch.setattr(_cuda, "run", lambda args: ops.reference(*args))
    with torch.no_grad():
        opt(*xs)
    assert [len(s.autotune) for s in rep.sites] == [1, 1, 1]
