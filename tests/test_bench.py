"""CPU tests of the benchmark runner (ct3d_fx/bench.py) and the example networks.

Every suite problem is built at tiny scale and run eagerly, in float64 and traced by
torch.fx; the whole runner path (optimize, capture of the fused calls, timing, floor, JSON) is
run on two tiny problems and one tiny network on the CPU reference path.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ct3d_fx import bench

REPO = Path(__file__).resolve().parent.parent
SUITE = bench.load_suite(bench.DEFAULT_SUITE)
IDS = [p["id"] for p in SUITE["problems"]]
BY_ID = {p["id"]: p for p in SUITE["problems"]}
FAST = ["--device", "cpu", "--no-compile", "--warmup-ms", "0", "--rep-ms", "1", "--quiet"]


def _load_example(name):
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_runs_as_a_module():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "ct3d_fx.bench", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--only", "--dtype", "--no-compile", "--json", "--plot", "--device", "--tiny",
                 "--networks", "--merge"):
        assert flag in r.stdout


def test_suite_is_complete_and_matches_shared_copy():
    assert len(IDS) == 26 and len(set(IDS)) == 26
    shared = REPO.parent / "shared" / "bench" / "suite.json"
    if shared.is_file():
        assert json.loads(shared.read_text()) == json.loads(bench.DEFAULT_SUITE.read_text())


def test_unknown_op_is_rejected_with_its_position(tmp_path):
    bad = {"problems": [{"id": "x1", "ct": {"in": 2, "out": 2, "k": 1}, "x": [1, 2, 4, 4, 4],
                         "post": [{"op": "relu"}, {"op": "frobnicate"}]}]}
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"x1: post\[1\] has unknown op 'frobnicate'"):
        bench.load_suite(path)


@pytest.mark.parametrize("pid", IDS)
def test_problem_builds_and_runs_at_tiny_scale(pid):
    model, shapes = bench.build_problem(BY_ID[pid], bench.TINY_SCALE, seed=0)
    assert not model.training
    inputs = [torch.rand(s) for s in shapes]
    with torch.no_grad():
        out = model(*inputs)
        assert torch.isfinite(out).all()
        # optimize() traces with torch.fx: the built model must trace and agree with eager
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(*inputs), out, rtol=0, atol=0)
        # the runner's float64 reference is a deep copy in float64
        out64 = copy.deepcopy(model).double()(*[t.double() for t in inputs])
    assert bench.max_rel_err(out, out64) < 1e-4
    if any(s["op"] == "batch_norm" for s in BY_ID[pid].get("post", [])):
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
        assert bn.running_mean.abs().sum() > 0 and not torch.all(bn.running_var == 1)


def test_shapes_full_and_scaled():
    for p in SUITE["problems"]:
        full = bench.problem_shapes(p, 1.0)
        assert list(full[0]) == p["x"]
    # input1 follows the scaled convolution output
    model, shapes = bench.build_problem(BY_ID["l2_26"], bench.TINY_SCALE)
    with torch.no_grad():
        y = model.conv_transpose(torch.rand(shapes[0]))
    assert tuple(y.shape) == tuple(shapes[1])
    # layer_norm over the last dim keeps the size it normalises (64 after the conv)
    for pid in ("l2_3", "l2_34"):
        model, shapes = bench.build_problem(BY_ID[pid], bench.TINY_SCALE)
        assert shapes[0][-1] == BY_ID[pid]["x"][-1]
    with pytest.raises(ValueError, match="scale"):
        bench.problem_shapes(BY_ID["l1_58"], 0.0)


def test_conv_cost_matches_the_published_baseline():
    # l1_58: 56.371 GFLOP and 113.8 MB in shared/bench/baseline_h200.json
    p = BY_ID["l1_58"]
    model, shapes = bench.build_problem(p, 1.0)
    out = bench._meta_trunk_shape(model, shapes[0])
    flops, nbytes = bench.conv_cost(shapes[0], model.conv_transpose.weight.shape, out, 1, 4)
    assert round(flops / 1e9, 3) == 56.371
    assert round(nbytes / 1e6, 1) == 113.8


def test_max_rel_err():
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert bench.max_rel_err(ref.clone(), ref) == 0
    assert bench.max_rel_err(ref + torch.tensor([0.0, 0.0, 0.4]), ref) == pytest.approx(0.1)
    assert math.isnan(bench.max_rel_err(torch.full((3,), float("nan")), ref))
    with pytest.raises(ValueError, match="shape"):
        bench.max_rel_err(ref[:2], ref)


def test_runner_on_cpu_writes_json_rows_and_merges(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    rc = bench.main(FAST + ["--only", "^(l2_100|l2_74|gan_generator_b1)$",
                            "--networks", "gan_generator", "--batches", "1",
                            "--json", str(out), "--markdown", str(tmp_path / "t.md")])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("date", "device", "torch", "cudnn", "ceilings", "rows"):
        assert key in data
    assert data["ceilings"]["floor_tflops"] > 0 and data["ceilings"]["copy_TBps"] > 0
    rows = {r["id"]: r for r in data["rows"]}
    assert set(rows) == {"l2_100", "l2_74", "gan_generator_b1"}
    for r in rows.values():
        assert set(bench.ROW_KEYS) <= set(r), r.keys()
        assert r["errors"] == {}, r["errors"]
        for k in ("eager_ms", "ct3d_ms", "fused_op_ms", "eager_conv_epilogue_ms", "floor_ms",
                  "floor_ratio"):
            assert r[k] > 0, k
        assert r["compile_ms"] is None  # --no-compile
        assert r["fused"] and all(c[0] == "ConvTranspose3d" for c in r["fused"])
        assert r["n_fused_calls"] == len(r["fused"])
        assert r["max_rel_err_vs_eager"] < 1e-5
        assert r["max_rel_err_vs_fp64"] < 1e-5
    assert rows["gan_generator_b1"]["n_fused_calls"] == 5
    text = capsys.readouterr().out
    assert "l2_100" in text and "err fp64" in text
    assert "| l2_74" in (tmp_path / "t.md").read_text()

    # --merge joins runs; later files win for repeated ids
    other = dict(data, rows=[dict(rows["l2_74"], eager_ms=123.0)])
    (tmp_path / "b.json").write_text(json.dumps(other))
    rc = bench.main(["--merge", str(out), str(tmp_path / "b.json"),
                     "--json", str(tmp_path / "m.json")])
    assert rc == 0
    merged = {r["id"]: r for r in json.loads((tmp_path / "m.json").read_text())["rows"]}
    assert set(merged) == set(rows) and merged["l2_74"]["eager_ms"] == 123.0


def test_runner_reports_bad_usage(capsys):
    if not torch.cuda.is_available():
        assert bench.main(["--only", "l2_100", "--networks", "none"]) == 2
        assert "use --device cpu" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--only", "no_such_id", "--networks", "none"]) == 2
    with pytest.raises(SystemExit):
        bench.main(["--networks", "resnet"])


@pytest.mark.parametrize("name", ["unet_decoder", "gan_generator"])
def test_example_networks_optimize_and_match(name, capsys):
    ex = _load_example(name)
    torch.manual_seed(0)
    model, shapes = ex.build(2, tiny=True)
    assert bench.check_optimized(model, [torch.rand(s) for s in shapes])
    assert "fused" in capsys.readouterr().out
