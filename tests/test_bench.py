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
import statistics
import subprocess
import sys
import types
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
                 "--networks", "--merge", "--rounds"):
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


class _FakeClock:
    """Stands in for ``time.perf_counter`` in bench: time passes only while a fake function
    'runs', by the amount it asks for, so drift is exact and the tests do not sleep."""

    def __init__(self):
        self.t = 0.0  # s
        self.log = []

    def perf_counter(self):
        return self.t

    def fn(self, name, ms, speed=lambda t_ms: 1.0):
        """A function that takes ``ms * speed(now in ms)``: the machine's speed drifts."""
        def run():
            self.log.append(name)
            self.t += ms * speed(self.t * 1e3) / 1e3
        return run


@pytest.fixture
def clock(monkeypatch):
    c = _FakeClock()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    return c


CPU = torch.device("cpu")


@pytest.mark.parametrize("speed", [lambda t: 1 + t / 400,  # the host slows down steadily
                                   lambda t: 1.6 if t > 60 else 1.0],  # or all at once
                         ids=["ramp", "step"])
def test_interleaved_paired_ratio_cancels_drift(clock, speed):
    # b takes twice a's time at every moment; the machine gets slower as the test goes on
    a, b = clock.fn("a", 1.0, speed), clock.fn("b", 2.0, speed)
    apart = bench.time_ms(b, CPU, warmup_ms=0, rep_ms=50) / bench.time_ms(a, CPU, warmup_ms=0,
                                                                          rep_ms=50)
    clock.t = 0.0
    res = bench.time_interleaved({"a": a, "b": b}, CPU, rounds=5, warmup_ms=0, rep_ms=50)
    paired = bench.paired_ratio(res["b"]["rounds_ms"], res["a"]["rounds_ms"])
    assert abs(apart / 2 - 1) > 0.1, apart  # timed one after the other: the drift is in it
    assert abs(paired / 2 - 1) < 0.03, (paired, res)
    for r in res.values():
        assert r["rounds"] == 5 == len(r["rounds_ms"]) and r["error"] is None
        assert r["ms"] == statistics.median(r["rounds_ms"])


def test_interleaved_rotates_the_order_and_keeps_the_budget(clock):
    fns = {n: clock.fn(n, 0.999) for n in "abc"}  # a hair under 1 ms: counts round down exactly
    res = bench.time_interleaved(fns, CPU, rounds=3, warmup_ms=2, rep_ms=30)
    # runs of one function: estimate + warm-up of each in order, then the rotated rounds
    blocks = [n for i, n in enumerate(clock.log) if i == 0 or clock.log[i - 1] != n]
    assert blocks == list("abc") + list("abc") + list("bca") + list("cab")
    # per function: 2 calls to estimate, 2 to warm up, 30 ms of timed calls (10 a round)
    assert all(clock.log.count(n) == 2 + 2 + 30 for n in "abc")
    assert all(r["rounds_ms"] == pytest.approx([0.999] * 3) for r in res.values())
    with pytest.raises(ValueError, match="rounds"):
        bench.time_interleaved(fns, CPU, rounds=0)


def test_interleaved_records_a_failure_and_times_the_others(clock):
    calls = {"n": 0}

    def flaky():  # fails in the second round
        calls["n"] += 1
        clock.t += 1e-3
        if calls["n"] > 2 + 2:
            raise RuntimeError("boom")

    def broken():
        raise ValueError("no such kernel")

    fns = {"a": clock.fn("a", 1.0), "flaky": flaky, "broken": broken, "b": clock.fn("b", 2.0)}
    res = bench.time_interleaved(fns, CPU, rounds=4, warmup_ms=0, rep_ms=8)
    assert res["broken"] == {"ms": None, "rounds_ms": [], "rounds": 0,
                             "error": "ValueError: no such kernel"}
    assert res["flaky"]["ms"] is None and res["flaky"]["error"] == "RuntimeError: boom"
    assert res["flaky"]["rounds"] == 1
    for n, ms in (("a", 1.0), ("b", 2.0)):
        assert res[n]["error"] is None and res[n]["rounds"] == 4
        assert res[n]["ms"] == pytest.approx(ms)


def test_interleaved_one_round_is_the_sequential_timing(clock):
    # rounds=1 times each function once, with time_ms's call count and its median
    f = clock.fn("f", 1.5, lambda t: 1 + t / 100)
    seq = bench.time_ms(f, CPU, warmup_ms=0, rep_ms=20)
    n_seq, clock.t = len(clock.log), 0.0
    res = bench.time_interleaved({"f": f}, CPU, rounds=1, warmup_ms=0, rep_ms=20)
    assert len(clock.log) == 2 * n_seq
    assert res["f"]["rounds"] == 1 and res["f"]["ms"] == pytest.approx(seq)
    assert bench.paired_ratio([3.0], [2.0]) == 1.5
    with pytest.raises(ValueError, match="equal"):
        bench.paired_ratio([1.0, 2.0], [1.0])


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
        # the models in 5 interleaved rounds (the default): medians of the round medians,
        # the speedup paired round by round
        rounds = r["model_round_ms"]
        assert set(rounds) == {"eager", "ct3d"} and all(len(v) == 5 for v in rounds.values())
        assert r["ct3d_ms"] == statistics.median(rounds["ct3d"])
        assert r["speedup_vs_eager"] == round(bench.paired_ratio(rounds["eager"],
                                                                 rounds["ct3d"]), 3)
    assert data["rounds"] == 5 and "interleaved" in data["timer"]
    assert rows["gan_generator_b1"]["n_fused_calls"] == 5
    text = capsys.readouterr().out
    assert "l2_100" in text and "err fp64" in text
    assert "| l2_74" in (tmp_path / "t.md").read_text()

    # --merge joins runs; later files win for repeated ids. b.json is from before v29: no
    # rounds, no model_round_ms; its row still merges, prints, and gets the key as null.
    old_row = {k: v for k, v in dict(rows["l2_74"], eager_ms=123.0).items()
               if k != "model_round_ms"}
    other = {k: v for k, v in dict(data, rows=[old_row]).items() if k != "rounds"}
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.warns(UserWarning, match="rounds=None"):
        rc = bench.main(["--merge", str(out), str(tmp_path / "b.json"),
                         "--json", str(tmp_path / "m.json")])
    assert rc == 0
    merged = {r["id"]: r for r in json.loads((tmp_path / "m.json").read_text())["rows"]}
    assert set(merged) == set(rows) and merged["l2_74"]["eager_ms"] == 123.0
    assert merged["l2_74"]["model_round_ms"] is None
    assert merged["l2_100"]["model_round_ms"] == rows["l2_100"]["model_round_ms"]
    assert "123.000" in capsys.readouterr().out
    rc = bench.main(["--merge", str(tmp_path / "b.json")])  # an old file alone
    assert rc == 0 and "l2_74" in capsys.readouterr().out


def test_runner_rounds_1_times_the_models_in_turn(tmp_path, monkeypatch):
    calls = []

    def time_ms(fn, device, **kw):
        calls.append(fn)
        return real(fn, device, **kw)

    def no_interleaving(*a, **kw):
        raise AssertionError("--rounds 1 must not interleave")

    real = bench.time_ms
    monkeypatch.setattr(bench, "time_ms", time_ms)
    monkeypatch.setattr(bench, "time_interleaved", no_interleaving)
    out = tmp_path / "r1.json"
    assert bench.main(FAST + ["--only", "^l2_100$", "--networks", "none", "--rounds", "1",
                              "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    r = data["rows"][0]
    # ceilings (2 matmuls, 1 copy), then eager, ct3d, the fused op, conv + epilogue
    assert len(calls) == 3 + 4
    assert r["model_round_ms"] == {"eager": [r["eager_ms"]], "ct3d": [r["ct3d_ms"]]}
    assert r["speedup_vs_eager"] == round(r["eager_ms"] / r["ct3d_ms"], 3)
    assert data["rounds"] == 1 and data["timer"] == "time.perf_counter median (CPU smoke run)"


def test_runner_records_a_failed_model_timing_and_times_the_rest(tmp_path, monkeypatch):
    real = bench.time_interleaved

    def ct3d_fails(fns, device, **kw):
        assert list(fns) == ["eager", "ct3d"] and kw["rounds"] == 3

        def boom():
            raise RuntimeError("launch failed")
        return real(dict(fns, ct3d=boom), device, **kw)

    monkeypatch.setattr(bench, "time_interleaved", ct3d_fails)
    out = tmp_path / "f.json"
    rc = bench.main(FAST + ["--only", "^l2_100$", "--networks", "none", "--rounds", "3",
                            "--json", str(out)])
    assert rc == 1  # a failed stage other than torch.compile
    r = json.loads(out.read_text())["rows"][0]
    assert r["errors"] == {"ct3d_ms": "RuntimeError: launch failed"}
    assert r["eager_ms"] > 0 and len(r["model_round_ms"]["eager"]) == 3
    assert r["ct3d_ms"] is None and "ct3d" not in r["model_round_ms"]
    assert r.get("speedup_vs_eager") is None
    assert r["fused_op_ms"] > 0 and r["op_speedup"] > 0  # the op timings go on


def test_runner_reports_bad_usage(capsys):
    if not torch.cuda.is_available():
        assert bench.main(["--only", "l2_100", "--networks", "none"]) == 2
        assert "use --device cpu" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--only", "no_such_id", "--networks", "none"]) == 2
    with pytest.raises(SystemExit):
        bench.main(["--networks", "resnet"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--rounds", "0"])


@pytest.mark.parametrize("name", ["unet_decoder", "gan_generator"])
def test_example_networks_optimize_and_match(name, capsys):
    ex = _load_example(name)
    torch.manual_seed(0)
    model, shapes = ex.build(2, tiny=True)
    assert bench.check_optimized(model, [torch.rand(s) for s in shapes])
    assert "fused" in capsys.readouterr().out
