#!/usr/bin/env bash
# One-shot check of the fused CUDA kernel on a fresh GPU machine.
#
#   scripts/gpu_check.sh LOGDIR [STEP ...]
#
# Steps (default: all, in this order; each writes LOGDIR/<step>.log):
#   install   pip install -e . (no dependencies, no build isolation: the machine is offline)
#   build     build the extension (prints the build time, fails if it does not build)
#   test      pytest tests/test_cuda_kernel.py tests/test_build.py (GPU and CPU tests);
#             the sweep's per-configuration errors go to LOGDIR/sweep.json (CT3D_TEST_REPORT=
#             to skip that file: at most 8 files come back from the device)
#   igemm     pytest -k igemm over tests/test_cuda_kernel.py (the channels-last GEMM's tile
#             configurations, row and box tiles), stopping at the first failure
#   probe     scripts/wgmma_probe.cu (the wgmma operand layout on its own: one m64n64 product
#             against a CPU result) and the count of HGMMA instructions in its SASS
#   wgmma     pytest -k wgmma (plus the large-patch box tests) over tests/test_cuda_kernel.py
#   sanitize  compute-sanitizer memcheck over the edge-tile, box-patch, wgmma and six-register
#             epilogue tests, the softmax epilogue on every kernel path (TF32, 64 channels) and
#             the LayerNorm epilogue on both W-line configurations (TF32, weight and bias)
#   example   python examples/quickstart.py, when it exists
#   time      fused op vs eager (ConvTranspose3d + epilogue) on suite problems, TF32 / exact
#             FP32 / BF16 (set CT3D_TIME_MODES="tf32" to shorten); LOGDIR/time.json
#   profile   ncu (Nsight Compute) on one launch each of two suite shapes
#   sweep     scripts/time_kernels.py on the suite for the kernel choices in CT3D_SWEEP_ALGOS
#             (default: auto and every IGEMM_CONFIGS id), CT3D_SWEEP_ONLY (a --only regex),
#             CT3D_SWEEP_DTYPE (--dtype, default fp32); LOGDIR/sweep_time[_DTYPE].json
#   bench     python -m ct3d_fx.bench (suite, no torch.compile), when ct3d_fx/bench.py exists;
#             LOGDIR/bench.json (CT3D_BENCH_BUDGET_S, default 240: the runner's --budget-s)
#   suite     the whole pytest suite (GPU and CPU tests); LOGDIR/suite.log
#   results   the committed benchmark, float32 with TF32 (torch.compile, float64 reference,
#             both example networks); LOGDIR/h200.json (CT3D_RESULTS_ENV: extra environment,
#             e.g. CT3D_FX_CUDNN_CHANNELS_LAST=0; CT3D_RESULTS_BUDGET_S, default 420)
#   results_low  the same for bf16 and exact FP32 (no torch.compile); LOGDIR/h200_bf16.json,
#             LOGDIR/h200_fp32_exact.json
#   spatial   tests/test_spatial_softmax.py, memcheck over its kernel tests, each form's time
#             (one-read shared 16 / 8 vectors, registers, two kernels; autotune off) against eager
#             softmax + mul on four tensors, and l2_38 through the runner; LOGDIR/l2_38.json
#   host      scripts/host_time.py on the GAN generator (host ms to enqueue a forward against GPU
#             ms per forward, eager and optimized): bf16 at batch 1 (with a profiler table,
#             LOGDIR/host_prof.txt), 2 and 8, fp32 at batch 1; LOGDIR/host.json
#   pool      tests/test_pool_tail.py and memcheck over its kernel tests
#   norm      tests/test_norm_tail.py, memcheck over some of its kernel tests, and
#             scripts/norm_time.py (the tail's kernels against PyTorch's norm + activation);
#             LOGDIR/norm_time.json
#   pass      tests/test_epilogue_pass.py and tests/test_cuda_autotune.py, memcheck over the
#             epilogue pass's kernel tests
#   bulk      the bulk-copy wgmma configurations 27 and 28 (csrc/ct3d_wgmma.cuh, v24): a 60 s
#             smoke run of each (scripts/bulk_smoke.py), their tests, memcheck over some of them,
#             and the fused op on the stride-1 suite rows with each forced (CT3D_BULK_ONLY,
#             CT3D_BULK_ALGOS): LOGDIR/bulk_time_fp32.json, LOGDIR/bulk_time_bf16.json
#   passlite  scripts/pass_time.py: the pass alone on suite output shapes, its vector kernels
#             (csrc/ct3d_pass_lite.cuh) on and off, against PyTorch's copy; LOGDIR/pass_time.json
#   passprof  Nsight Compute on two launches of the epilogue pass (bf16 NCDHW in place, float32
#             channels_last_3d -> NCDHW)
#   rows      the runner on chosen rows: CT3D_ROWS (float32/TF32 with torch.compile;
#             LOGDIR/rows.json), CT3D_ROWS_BF16 (bf16; LOGDIR/rows_bf16.json)
#   gan       scripts/host_time.py on the GAN generator at TF32 batch 1 and 8 and bf16 batch 2:
#             per-site candidate times with the autotune's medians, and the whole forward with
#             the autotune off (CT3D_FX_AUTOTUNE=0) to compare
#   passtime  scripts/site_times.py on bf16 l1_68 / l2_26 and TF32 l2_100 / l2_61 (the epilogue
#             pass alone and the candidates that use it)
#   dirprof   Nsight Compute on one direct-kernel launch (l1_72's shape, TF32): speed of light,
#             warp states, instruction mix; per source line LOGDIR/dirprof_source.csv
#   staged    the direct kernel's staged-input form (ALGO "direct_staged"): pytest -k "direct or
#             staged" over tests/test_cuda_kernel.py, memcheck over its 20 forced-shape tests,
#             and the fused op on the nine direct-kernel suite rows with ALGO direct and
#             direct_staged (scripts/time_kernels.py) in TF32, bf16 and exact FP32:
#             LOGDIR/staged_time_fp32.json, staged_time_bf16.json, staged_time_fp32-exact.json
#   subpixel  tests/test_subpixel.py and tests/test_cuda_autotune.py, then the GAN generator:
#             host_time --sites at TF32 batch 1 / 8 and bf16 batch 2 / 8 (subpixel_ms per site),
#             and its bench rows (LOGDIR/gan_tf32.json, LOGDIR/gan_bf16.json)
#   bare      scripts/time_kernels.py --bare on the suite rows with epilogue programs (the fused
#             op with and without its program), TF32 and bf16: LOGDIR/bare_time_fp32.json,
#             LOGDIR/bare_time_bf16.json (CT3D_BARE_ONLY: another --only regex)
#   siteprof  Nsight Compute on suite sites with their programs (profile_shapes.py --site;
#             CT3D_SITEPROF_SPECS): LOGDIR/siteprof_sections.txt, siteprof_source.csv.gz
#   pack      the built extension library as ext.tgz in CT3D_PACK_DIR (default LOGDIR), to
#             carry into the next call: unpack it into a carried folder and point
#             TORCH_EXTENSIONS_DIR there (_build imports a library it finds as is)
# Exit status: 0 when every step passed. The last lines printed are a summary.
set -u -o pipefail
LOG=${1:?usage: scripts/gpu_check.sh LOGDIR [install build test sanitize example time bench]}
shift
STEPS=${*:-install build test sanitize example time bench}
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ct3d_fx_extensions}
PY=${PYTHON:-python3}
SUMMARY=""
FAILED=0

run_step() {  # run_step NAME TIMEOUT_S: runs the function step_NAME in a child bash
  local name=$1 limit=$2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" bash -c "step_$name" >"$LOG/$name.log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  tail -n 12 "$LOG/$name.log"
  echo "=== $name: exit $rc after ${dt}s"
  SUMMARY="$SUMMARY\n$(printf '%-9s exit %3d  %4ds' "$name" "$rc" "$dt")"
  [ "$rc" -eq 0 ] || FAILED=1
}

step_install() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    nvcc --version | tail -n 2
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    "$PY" -m pip install --no-deps --no-build-isolation -q -e .
  }
}

step_build() {
  "$PY" - <<'EOF'
import time, torch
from ct3d_fx import _build
t = time.perf_counter()
mod = _build.load()
print(f"load() took {time.perf_counter() - t:.1f} s; module {mod}; why_not: {_build.why_not()}")
print("implementation:", _build.implementation_name("cuda", torch.float32))
raise SystemExit(0 if mod is not None else 1)
EOF
}

step_test() {
  CT3D_TEST_REPORT="${CT3D_TEST_REPORT-$LOG/sweep.json}" "$PY" -m pytest -p no:cacheprovider -q -rfE \
    tests/test_cuda_kernel.py tests/test_build.py
}

step_sanitize() {
  compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    --report-api-errors no \
    "$PY" -m pytest -p no:cacheprovider -q tests/test_cuda_kernel.py \
    -k "edge_tiles or box_large_patch or wgmma_runs or six_tile_registers or (softmax_epilogue and tf32 and dag and 64) or (layernorm_epilogue and tf32 and both and dag)"
}

step_probe() {
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc scripts/wgmma_probe.cu \
    -o /tmp/wgmma_probe || return 2
  echo "HGMMA instructions in the probe's SASS: $(cuobjdump -sass /tmp/wgmma_probe | grep -c HGMMA)"
  /tmp/wgmma_probe
}

step_wgmma() {
  "$PY" -m pytest -p no:cacheprovider -q -rfE --maxfail=5 tests/test_cuda_kernel.py \
    -k "wgmma or box_large_patch"
}

step_igemm() {
  "$PY" -m pytest -p no:cacheprovider -q -x -rfE tests/test_cuda_kernel.py -k igemm
}

step_sweep() {
  local algos=${CT3D_SWEEP_ALGOS:-auto,$(seq -s, -f 'igemm:%g' 0 17)}
  local dt=${CT3D_SWEEP_DTYPE:-fp32}
  "$PY" scripts/time_kernels.py --algos "$algos" ${CT3D_SWEEP_ONLY:+--only "$CT3D_SWEEP_ONLY"} \
    --dtype "$dt" --json "$LOG/sweep_time_$dt.json"
}

step_time() {
  "$PY" - "$LOG/time.json" <<'EOF'
import json, math, os, sys
import torch
from ct3d_fx import _build, ops
from ct3d_fx.ops import Opcode

OP = torch.ops.ct3d.conv_transpose3d_epilogue.default
try:
    from triton.testing import do_bench
except ImportError:
    do_bench = None


def bench(fn):
    if do_bench is not None:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(3):
        fn()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def prog(*rows):
    out = []
    for r in rows:
        out += list(r) + [-1] * (6 - len(r))
    return [int(v) for v in out]


# (id, input shape, C_out, kernel, stride, padding, output_padding, dilation, groups, bias,
#  epilogue: (program, scalars, extras(device, dtype, out_shape)))  -- suite.json problems; the
# epilogue is the fusable prefix of each problem's "post" list.
P = [
    ("l1_58", [16, 32, 16, 32, 64], 16, [3, 5, 7], 1, 0, 0, 1, 1, False, None),
    ("l1_61", [8, 48, 64, 64, 64], 48, [3, 3, 3], 1, 0, 0, 1, 1, False, None),
    ("l1_68", [16, 32, 64, 64, 64], 64, [3, 5, 5], 1, 0, 0, 1, 1, False, None),
    ("l1_70", [8, 48, 96, 96, 96], 24, [3, 3, 3], 1, 0, 0, 1, 1, False, None),
    ("l1_72", [8, 32, 12, 24, 48], 32, [3, 5, 7], 2, [1, 2, 3], 1, 1, 4, False, None),
    ("l1_73", [4, 32, 32, 64, 128], 32, [3, 3, 3], 2, 1, 0, 1, 1, False, None),
    ("l1_77", [16, 32, 16, 32, 32], 64, [3, 3, 3], 2, 1, 0, 2, 1, False, None),
    ("l2_100", [16, 64, 24, 48, 48], 128, [3, 3, 3], 2, 1, 0, 1, 1, True,
     lambda dev, dt, shp: (prog((Opcode.CLAMP, 0, 0, -1), (Opcode.LOAD_SCALAR, 1),
                                (Opcode.DIV, 1, 2)), [-1.0, 2.0], [])),
    ("l2_20", [16, 32, 16, 32, 32], 64, [3, 3, 3], 2, 1, 1, 1, 1, True,
     lambda dev, dt, shp: (prog((Opcode.LOAD_TENSOR, 0), (Opcode.ADD, 0, 1), (Opcode.ADD, 2, 0),
                                (Opcode.MUL, 3, 0), (Opcode.ADD, 4, 0)), [],
                           [torch.randn(shp[1], 1, 1, 1, device=dev, dtype=dt)])),
    ("l2_26", [128, 32, 16, 16, 16], 64, [3, 3, 3], 2, 1, 1, 1, 1, True,
     lambda dev, dt, shp: (prog((Opcode.LOAD_TENSOR, 0), (Opcode.ADD, 0, 1), (Opcode.HARDSWISH, 2),
                                (Opcode.MUL, 2, 3)), [],
                           [torch.randn(shp, device=dev, dtype=dt)])),
    ("l2_50", [128, 3, 16, 32, 32], 16, [3, 3, 3], 2, 1, 0, 1, 1, True,
     lambda dev, dt, shp: (prog((Opcode.LOAD_SCALAR, 0), (Opcode.MUL, 0, 1)), [0.5], [])),
    ("l2_72", [64, 3, 32, 32, 32], 16, [3, 3, 3], 2, 1, 0, 1, 1, True,
     lambda dev, dt, shp: (prog((Opcode.BATCH_NORM, 0, 0, 1, 0)), [1e-5],
                           [torch.randn(shp[1], device=dev) * 0.3,
                            torch.rand(shp[1], device=dev) + 0.5,
                            torch.randn(shp[1], device=dev), torch.randn(shp[1], device=dev)])),
]
MODES = os.environ.get("CT3D_TIME_MODES", "tf32 fp32 bf16").split()
DT = {"tf32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}
name = torch.cuda.get_device_name(0)
rows = []
print(f"device: {name}; torch {torch.__version__}")
for mode in MODES:
    torch.backends.cudnn.allow_tf32 = mode != "fp32"
    dt = DT[mode]
    for pid, xs, cout, k, s, p, op, d, g, bias, epi in P:
        torch.manual_seed(0)
        x = torch.randn(xs, device="cuda", dtype=dt)
        cin = xs[1]
        w = (torch.randn(cin, cout // g, *k, device="cuda") / math.sqrt(cin / g * math.prod(k))).to(dt)
        b = torch.randn(cout, device="cuda", dtype=dt) if bias else None
        st, pa, opd, di = [s] * 3, (p if isinstance(p, list) else [p] * 3), [op] * 3, [d] * 3
        shp = ops.output_shape(x, w, st, pa, opd, di, g)
        program, scalars, extras = epi("cuda", dt, shp) if epi else ([], [], [])
        args = (x, w, b, st, pa, opd, di, g, program, scalars, extras)
        out = OP(*args)
        ref = ops.reference(*args)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        t_fused = bench(lambda: OP(*args))
        t_eager = bench(lambda: ops.reference(*args))
        row = dict(id=pid, mode=mode, fused_ms=t_fused, eager_ms=t_eager,
                   speedup=t_eager / t_fused, rel_err_vs_eager=err, device=name)
        rows.append(row)
        print(f"{mode:5s} {pid:7s} fused {t_fused:9.3f} ms  eager {t_eager:9.3f} ms  "
              f"x{t_eager / t_fused:6.2f}  rel.err vs eager {err:.2e}", flush=True)
        del x, w, b, out, ref, args, extras
        torch.cuda.empty_cache()
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
for mode in MODES:
    sp = [r["speedup"] for r in rows if r["mode"] == mode]
    if sp:
        print(f"{mode}: geomean speedup of the fused op over eager: "
              f"{math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x over {len(sp)} problems")
EOF
}

step_example() {
  if [ ! -f examples/quickstart.py ]; then echo "examples/quickstart.py not present; skipped"; return 0; fi
  "$PY" examples/quickstart.py
}

step_profile() {
  # Nsight Compute on one launch of each of two suite shapes: l2_50 (C_in 3 -> 16, stride 2,
  # memory-bound) and l2_100 (64 -> 128, stride 2, math-bound); clocks left alone.
  cat >/tmp/ct3d_profile.py <<'PROF'
import math, torch
from ct3d_fx.ops import Opcode
OP = torch.ops.ct3d.conv_transpose3d_epilogue.default
prog = [int(v) for v in (Opcode.LOAD_SCALAR, 0, -1, -1, -1, -1, Opcode.MUL, 0, 1, -1, -1, -1)]
for xs, cout in (([128, 3, 16, 32, 32], 16), ([16, 64, 24, 48, 48], 128)):
    x = torch.randn(xs, device="cuda")
    w = torch.randn(xs[1], cout, 3, 3, 3, device="cuda") / math.sqrt(xs[1] * 27)
    b = torch.randn(cout, device="cuda")
    OP(x, w, b, [2] * 3, [1] * 3, [0] * 3, [1] * 3, 1, prog, [0.5], [])
torch.cuda.synchronize()
PROF
  ncu --clock-control none -k regex:conv_transpose3d_fused --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    "$PY" /tmp/ct3d_profile.py
  if [ -n "${CT3D_PROFILE_SOURCE:-}" ]; then  # per source line: executed instructions, stalls
    ncu --clock-control none -k regex:conv_transpose3d_fused --launch-count 1 \
      --section SourceCounters --page source --print-source cuda,sass --csv \
      "$PY" /tmp/ct3d_profile.py >"$LOG/profile_source.csv" 2>"$LOG/profile_source.err"
    echo "source-level profile: exit $? ($(wc -l <"$LOG/profile_source.csv") lines)"
  fi
}

step_bench() {
  if [ ! -f ct3d_fx/bench.py ]; then echo "ct3d_fx/bench.py not present; skipped"; return 0; fi
  "$PY" -m ct3d_fx.bench --no-compile --networks none --budget-s "${CT3D_BENCH_BUDGET_S:-240}" \
    --json "$LOG/bench.json"
}

step_suite() {
  "$PY" -m pytest -p no:cacheprovider -q -rfE
}

step_results() {  # float32 with TF32: torch.compile, float64 reference, both networks
  env ${CT3D_RESULTS_ENV:-} "$PY" -m ct3d_fx.bench --warmup-ms 25 --rep-ms 100 \
    --budget-s ${CT3D_RESULTS_BUDGET_S:-420} --json "$LOG/h200.json"
}

step_results_low() {  # bf16 and exact FP32 (no torch.compile, no float64 reference)
  local B="--warmup-ms 25 --rep-ms 100 --no-compile --no-fp64"
  env ${CT3D_RESULTS_ENV:-} "$PY" -m ct3d_fx.bench $B --dtype bf16 --budget-s 150 \
    --json "$LOG/h200_bf16.json" &&
  env ${CT3D_RESULTS_ENV:-} "$PY" -m ct3d_fx.bench $B --dtype fp32-exact --networks none \
    --budget-s 180 --json "$LOG/h200_fp32_exact.json"
}

step_spatial() {  # the spatial softmax kernel: its tests, memcheck, timing, and l2_38 end to end
  "$PY" -m pytest -p no:cacheprovider -q -rfE tests/test_spatial_softmax.py || return 1
  "$PY" - <<'EOF2'
import torch
from triton.testing import do_bench
import ct3d_fx  # noqa: F401
from ct3d_fx import _cuda, spatial_softmax as ss
_cuda.AUTOTUNE = False  # each form as set below, not the autotune's pick
for shape, dt in [((32, 64, 32, 64, 64), torch.float32), ((32, 64, 32, 64, 64), torch.bfloat16),
                  ((8, 32, 16, 32, 32), torch.float32), ((16, 64, 16, 32, 64), torch.float32)]:
    x = torch.randn(shape, device="cuda", dtype=dt)
    w = torch.randn(1, shape[1], 1, 1, 1, device="cuda", dtype=dt)
    def eager():
        return torch.softmax(x.view(shape[0], shape[1], -1), dim=2).view(shape) * w
    gb = x.numel() * x.element_size() / 1e9
    ms, paths = {}, {}
    # the one-read forms (where they apply): shared memory with 16 / 8 vectors per thread,
    # registers; then the two kernels; the autotune is bypassed (run() is given each form)
    for name, (mc, vecs) in {"shared16": (8, 16), "shared8": (8, 8), "registers": (8, 0),
                             "two_pass": (0, 16)}.items():
        ss.MAX_CLUSTER, ss.SHARED_VECS = mc, vecs
        ms[name] = do_bench(lambda: ss.run(x, False, w), warmup=25, rep=200,
                            return_mode="median")
        paths[name] = ss.LAST_PATH
    ss.MAX_CLUSTER, ss.SHARED_VECS = 8, 16
    ms_e = do_bench(eager, warmup=25, rep=200, return_mode="median")
    print(f"spatial softmax {tuple(shape)} {dt}: eager softmax + mul {ms_e:.3f} ms; " + ", ".join(
        f"{k} ({paths[k]}) {v:.3f} ms = {(3 if paths[k] == 'two_pass' else 2) * gb / v:.2f} "
        f"TB/s, {ms_e / v:.2f}x" for k, v in ms.items()))
EOF2
  "$PY" -m ct3d_fx.bench --only '^l2_38$' \
    --json "$LOG/l2_38.json" || return 2
  compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    --report-api-errors no "$PY" -m pytest -p no:cacheprovider -q tests/test_spatial_softmax.py \
    -k "kernel_matches and not f16 and (none or channel)"
}

step_host() {  # host-bound small models: the GAN generator's host time against its GPU time
  local rc=0
  "$PY" scripts/host_time.py --dtype bf16 --batch 1 --prof "$LOG/host_prof.txt" --sites \
    --json "$LOG/host_bf16_b1.json" || rc=1
  for a in "bf16 2" "bf16 8" "fp32 1"; do
    set -- $a
    "$PY" scripts/host_time.py --dtype "$1" --batch "$2" --sites --json "$LOG/host_$1_b$2.json" || rc=1
  done
  "$PY" - "$LOG" <<'EOF2'
import glob, json, os, sys
rows = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(sys.argv[1], "host_*_b*.json")))]
json.dump(rows, open(os.path.join(sys.argv[1], "host.json"), "w"), indent=1)
EOF2
  rm -f "$LOG"/host_*_b*.json
  return $rc
}

step_pool() {  # the pooled tail (avg and max): its tests and memcheck over its kernel tests
  "$PY" -m pytest -p no:cacheprovider -q -rfE tests/test_pool_tail.py || return 1
  compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    --report-api-errors no "$PY" -m pytest -p no:cacheprovider -q tests/test_pool_tail.py \
    -k "(kernel_matches and None) or propagates_nan or minus_inf"
}

step_norm() {  # the normalization tail (GroupNorm / InstanceNorm + activation): its tests,
  # memcheck over some of its kernel tests, and its kernels against PyTorch's norm + activation
  # (scripts/norm_time.py; LOGDIR/norm_time.json)
  "$PY" -m pytest -p no:cacheprovider -q -rfE tests/test_norm_tail.py || return 1
  compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    --report-api-errors no "$PY" -m pytest -p no:cacheprovider -q tests/test_norm_tail.py \
    -k "(kernel_matches and float32 and (relu or None)) or nan_stays or affine_parts" || return 1
  "$PY" scripts/norm_time.py --json "$LOG/norm_time.json"
}

step_pass() {  # the epilogue pass: its tests, the autotune's, and memcheck over its kernel tests
  "$PY" -m pytest -p no:cacheprovider -q -rfE tests/test_epilogue_pass.py \
    tests/test_cuda_autotune.py || return 1
  compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    --report-api-errors no "$PY" -m pytest -p no:cacheprovider -q tests/test_epilogue_pass.py \
    -k "(matches and bias and not nobias and (case0 or case2 or case3) and (relu or side_input or broadcast)) or in_place or float32_output or batch_one"
}

step_bulk() {  # the bulk-copy wgmma configurations (27, 28): a 60 s smoke run of each (a
  # pipeline that deadlocks shows here, not as a hung step), their tests, memcheck over the
  # bulk-shape tests, then the fused op on the stride-1 suite rows with each configuration forced
  # (LOGDIR/bulk_time_fp32.json, LOGDIR/bulk_time_bf16.json)
  local c rc=0
  for c in 27 28; do
    timeout 60 "$PY" scripts/bulk_smoke.py "$c" || { echo "smoke: config $c failed or hung"; return 1; }
  done
  "$PY" -m pytest -p no:cacheprovider -q -rfE --maxfail=5 tests/test_cuda_kernel.py \
    -k "wgmma or bulk or igemm_configs" || rc=1
  compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    --report-api-errors no "$PY" -m pytest -p no:cacheprovider -q tests/test_cuda_kernel.py \
    -k "bulk_shapes and tf32" || rc=1
  local only=${CT3D_BULK_ONLY:-'^(l1_61|l1_68|l2_13|l2_61|l2_77|l1_58|l1_70)$'}
  local algos=${CT3D_BULK_ALGOS:-auto,igemm:22,igemm:23,igemm:24,igemm:27,igemm:28}
  "$PY" scripts/time_kernels.py --algos "$algos" --only "$only" --dtype fp32 \
    --json "$LOG/bulk_time_fp32.json" || rc=1
  "$PY" scripts/time_kernels.py --algos "$algos" --only "$only" --dtype bf16 \
    --json "$LOG/bulk_time_bf16.json" || rc=1
  return $rc
}

step_passlite() {  # the epilogue pass alone on suite output shapes: the vector kernels on / off
  # and PyTorch's layout copy (scripts/pass_time.py; LOGDIR/pass_time.json)
  "$PY" scripts/pass_time.py --json "$LOG/pass_time.json"
}

step_rows() {  # chosen rows through the runner: CT3D_ROWS (an --only regex; float32 with TF32,
  # torch.compile, no float64 reference; LOGDIR/rows.json) and CT3D_ROWS_BF16 (bf16, no
  # torch.compile; LOGDIR/rows_bf16.json); either empty to skip it
  local rc=0
  if [ -n "${CT3D_ROWS:-}" ]; then
    "$PY" -m ct3d_fx.bench --only "$CT3D_ROWS" --networks none --no-fp64 \
      --json "$LOG/rows.json" || rc=1
  fi
  if [ -n "${CT3D_ROWS_BF16:-}" ]; then
    "$PY" -m ct3d_fx.bench --only "$CT3D_ROWS_BF16" --dtype bf16 --networks none --no-fp64 \
      --no-compile --json "$LOG/rows_bf16.json" || rc=1
  fi
  return $rc
}

step_passprof() {
  # Nsight Compute on the epilogue pass (csrc/kernels_epilogue_pass.cu): bf16 in place on an
  # NCDHW tensor of l1_68's output size with no program (a copy: 1.1 TB/s in v20), and float32
  # channels_last_3d -> NCDHW with l2_100's clamp / div (~3 TB/s); clocks left alone.
  cat >/tmp/ct3d_passprof.py <<'PROF'
import torch
import ct3d_fx._cuda as cu
from ct3d_fx import _build
from ct3d_fx.ops import Opcode as O
ext = _build.load()
def row(*f): return [int(v) for v in f] + [-1] * (6 - len(f))
cases = [((16, 32, 64, 64, 64), 64, (3, 5, 5), 1, 0, torch.bfloat16, [], [], False),
         ((16, 64, 24, 48, 48), 128, (3, 3, 3), 2, 1, torch.float32,
          row(O.CLAMP, 0, 0, -1) + row(O.LOAD_SCALAR, 1) + row(O.DIV, 1, 2), [-1.0, 2.0], True)]
for xs, cout, k, st, pa, dt, prog, sc, cl in cases:
    x = torch.randn(xs, device="cuda", dtype=dt)
    w = torch.randn(xs[1], cout, *k, device="cuda", dtype=dt)
    args = (x, w, None, [st] * 3, [pa] * 3, [0] * 3, [1] * 3, 1, prog, sc, [])
    plan = cu._get_plan(*args)
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    y = torch.nn.functional.conv_transpose3d(x.contiguous(memory_format=fmt),
                                             w.contiguous(memory_format=fmt), None, st, pa)
    out = y if not cl else torch.empty(plan.shape, device="cuda", dtype=plan.dtype)
    cu._run_pass(ext, plan, y, None, [], out)
torch.cuda.synchronize()
PROF
  ncu --clock-control none -k regex:epilogue_pass --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section SchedulerStats --section InstructionStats "$PY" /tmp/ct3d_passprof.py
}

step_gan() {  # the GAN generator: per-site candidate times and the autotune's medians (host_time
  # --sites), and the whole forward with the autotune on and off, at TF32 batch 1 and 8, bf16 batch 2
  local rc=0
  for cfg in "fp32 1" "fp32 8" "bf16 2"; do
    set -- $cfg
    echo "### $1 batch $2, autotune on, sites"
    "$PY" scripts/host_time.py --dtype "$1" --batch "$2" --sites || rc=1
    echo "### $1 batch $2, autotune off"
    CT3D_FX_AUTOTUNE=0 "$PY" scripts/host_time.py --dtype "$1" --batch "$2" || rc=1
  done
  return $rc
}

step_passtime() {  # the epilogue pass alone and its candidates on three suite rows
  "$PY" scripts/site_times.py --dtype bf16 --only '^(l1_68|l2_26)$' &&
    "$PY" scripts/site_times.py --dtype fp32 --only '^(l2_100|l2_61)$'
}

step_subpixel() {  # the "subpixel" candidate: its tests, then the GAN generator's per-site times
  # (host_time --sites: subpixel_ms and the autotune's medians) and whole forwards at TF32 batch 1
  # and 8, bf16 batch 2 and 8, and the GAN rows of the bench in both modes
  "$PY" -m pytest -p no:cacheprovider -q -rfE tests/test_subpixel.py tests/test_cuda_autotune.py \
    || return 1
  local rc=0
  for cfg in "fp32 1" "fp32 8" "bf16 2" "bf16 8"; do
    set -- $cfg
    echo "### $1 batch $2, sites"
    "$PY" scripts/host_time.py --dtype "$1" --batch "$2" --sites || rc=1
  done
  "$PY" -m ct3d_fx.bench --no-suite --networks gan_generator --no-fp64 \
    --json "$LOG/gan_tf32.json" || rc=1
  "$PY" -m ct3d_fx.bench --no-suite --networks gan_generator --no-fp64 --no-compile \
    --dtype bf16 --json "$LOG/gan_bf16.json" || rc=1
  return $rc
}

step_pack() {
  local dest=${CT3D_PACK_DIR:-$LOG}/ext.tgz
  (cd "$TORCH_EXTENSIONS_DIR" && tar -czf "$dest" ./*/*.so) && ls -la "$dest"
}

export LOG PY
step_dirprof() {
  # Nsight Compute on one direct-kernel launch: l1_72 (groups 4, 8 -> 8 channels per group,
  # k 3x5x7, stride 2; the worst op/floor row), TF32 defaults, no epilogue program; warp stall
  # reasons and, per source line, executed instructions and stalls (dirprof_source.csv)
  cat >/tmp/ct3d_dirprof.py <<'PROF'
import math, torch
import ct3d_fx._cuda as cu
OP = torch.ops.ct3d.conv_transpose3d_epilogue.default
x = torch.randn(8, 32, 12, 24, 48, device="cuda")
w = torch.randn(32, 8, 3, 5, 7, device="cuda") / math.sqrt(8 * 105)
cu.ALGO = "direct"
OP(x, w, None, [2] * 3, [1, 2, 3], [1] * 3, [1] * 3, 4, [], [], [])
torch.cuda.synchronize()
print("kernel", cu.LAST_KERNEL)
PROF
  ncu --clock-control none -k regex:direct_kernel --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section SchedulerStats --section InstructionStats "$PY" /tmp/ct3d_dirprof.py
  ncu --clock-control none -k regex:direct_kernel --launch-count 1 \
    --section SourceCounters --page source --print-source cuda,sass --csv \
    "$PY" /tmp/ct3d_dirprof.py >"$LOG/dirprof_source.csv" 2>"$LOG/dirprof_source.err"
  echo "source-level profile: exit $? ($(wc -l <"$LOG/dirprof_source.csv") lines)"
}

step_staged() {  # the direct kernel's staged-input form (csrc/ct3d_conv.cuh, forced only): its
  # tests with the direct kernel's, memcheck over its forced-shape tests (CPU float64 reference,
  # no cuDNN under the sanitizer), then the fused op alone on the direct-kernel suite rows with
  # each form forced, in TF32, bf16 and exact FP32 (time_kernels.py: do_bench medians, L2 flushed;
  # short warmup / repeats to keep the step near 4 minutes)
  local rc=0 dt
  "$PY" -m pytest -p no:cacheprovider -q -rfE tests/test_cuda_kernel.py -k "direct or staged" \
    || rc=1
  compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    --report-api-errors no "$PY" -m pytest -p no:cacheprovider -q tests/test_cuda_kernel.py \
    -k "direct_staged_forced" || rc=1
  for dt in fp32 bf16 fp32-exact; do
    "$PY" scripts/time_kernels.py --algos direct,direct_staged --dtype "$dt" \
      --only '^(l1_72|l2_50|l2_58|l2_60|l2_72|l2_89|l2_96|l2_15|l2_74)$' \
      --warmup-ms 10 --rep-ms 40 --json "$LOG/staged_time_$dt.json" || rc=1
  done
  return $rc
}
export -f step_staged

step_bare() {  # what the epilogue program costs inside the fused kernel: time_kernels.py --bare
  # (the same calls with the program removed) on the suite rows with programs (CT3D_BARE_ONLY),
  # float32 with TF32 and bf16: LOGDIR/bare_time_fp32.json, LOGDIR/bare_time_bf16.json
  local rc=0 dt
  for dt in fp32 bf16; do
    "$PY" scripts/time_kernels.py --algos auto --bare --dtype "$dt" \
      --only "${CT3D_BARE_ONLY:-^(l2_100|l2_15|l2_20|l2_26|l2_38|l2_61|l2_74|l2_77|l2_50|l2_60|l2_72|l2_96)$}" \
      --warmup-ms 10 --rep-ms 40 --json "$LOG/bare_time_$dt.json" || rc=1
  done
  return $rc
}

step_siteprof() {  # Nsight Compute on suite sites with their epilogue programs
  # (scripts/profile_shapes.py --site; CT3D_SITEPROF_SPECS, default "l2_20:auto l2_26:auto"):
  # sections in LOGDIR/siteprof_sections.txt, source counters of the first spec in
  # LOGDIR/siteprof_source.csv.gz
  local rc=0 specs=(${CT3D_SITEPROF_SPECS:-l2_20:auto l2_26:auto})
  ncu --clock-control none --profile-from-start off -k regex:"conv_transpose3d_" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section InstructionStats --section MemoryWorkloadAnalysis \
    "$PY" scripts/profile_shapes.py --site "${specs[@]}" >"$LOG/siteprof_sections.txt" 2>&1 || rc=1
  ncu --clock-control none --profile-from-start off -k regex:"conv_transpose3d_" \
    --section SourceCounters --page source --print-source cuda,sass --csv \
    "$PY" scripts/profile_shapes.py --site "${specs[0]}" >"$LOG/siteprof_source.csv" 2>/dev/null \
    || rc=1
  gzip -f "$LOG/siteprof_source.csv"
  grep -E "site ran|Duration|Executed Instructions  |Registers Per|Achieved Occupancy" \
    "$LOG/siteprof_sections.txt"
  return $rc
}
export -f step_bare step_siteprof
export -f step_spatial step_install step_build step_test step_sanitize step_example step_time step_profile \
  step_bench step_igemm step_sweep step_probe step_wgmma step_suite step_results step_results_low \
  step_pack step_host step_pool step_pass step_rows step_passprof step_gan step_passtime \
  step_dirprof step_subpixel step_passlite step_bulk step_norm
for s in $STEPS; do
  case $s in
    install) run_step install 300 ;;
    build) run_step build 400 ;;
    test) run_step test 420 ;;
    sanitize) run_step sanitize 300 ;;
    igemm) run_step igemm 400 ;;
    probe) run_step probe 120 ;;
    wgmma) run_step wgmma 300 ;;
    bulk) run_step bulk 560 ;;
    sweep) run_step sweep 500 ;;
    example) run_step example 120 ;;
    time) run_step time 420 ;;
    profile) run_step profile 240 ;;
    bench) run_step bench $(( ${CT3D_BENCH_BUDGET_S:-240} + 120 )) ;;
    suite) run_step suite 420 ;;
    results) run_step results $(( ${CT3D_RESULTS_BUDGET_S:-420} + 150 )) ;;
    results_low) run_step results_low 420 ;;
    pack) run_step pack 60 ;;
    host) run_step host 300 ;;
    spatial) run_step spatial 300 ;;
    pool) run_step pool 240 ;;
    norm) run_step norm 300 ;;
    pass) run_step pass 300 ;;
    rows) run_step rows 480 ;;
    passprof) run_step passprof 300 ;;
    gan) run_step gan 300 ;;
    passtime) run_step passtime 240 ;;
    passlite) run_step passlite 240 ;;
    dirprof) run_step dirprof 240 ;;
    staged) run_step staged 360 ;;
    bare) run_step bare 300 ;;
    siteprof) run_step siteprof 300 ;;
    subpixel) run_step subpixel 420 ;;
    *) echo "unknown step $s"; FAILED=1 ;;
  esac
done
echo -e "=== summary ($LOG)$SUMMARY"
exit $FAILED
