#!/usr/bin/env bash
# A/B timing of a source change in one device call: the fused op on suite rows, built from the
# working tree ("new") and from baseline copies of the changed files ("base"; optionally "mid":
# the new tree with only some files taken from the baseline, to split a change in two), each
# variant its own extension build (they register the same torch ops, so one process cannot load
# two) and its own processes, run in alternation: base, [mid,] new, base, ... per dtype and round.
#
#   scripts/ab_time.sh LOGDIR BASEDIR [MID_FILE ...]
#
# BASEDIR holds the baseline versions of the changed files at their repository paths (make it with
# `git show REF:path`); every file under it replaces the tree's copy in "base". MID_FILEs
# (repository paths under BASEDIR) replace the tree's copies in "mid". Runs without the editable
# install (PYTHONPATH points at each variant's copy, so ct3d_fx finds that copy's csrc/); each
# variant prints the csrc/ it built, and the run stops if a variant would build another tree's csrc/
# (after `pip install -e .`, e.g. gpu_check.sh's install step, the editable install's import hook
# maps ct3d_fx.csrc to the installed tree: run the A/B in a call without that step). Environment:
# AB_ONLY (time_kernels.py --only regex), AB_DTYPES (default "fp32 bf16"), AB_ROUNDS (default 2),
# AB_ALGOS (default auto), AB_WARMUP_MS / AB_REP_MS (10 / 40). AB_SCRIPT: another timing script
# to run per variant and round instead of time_kernels.py, called as `AB_SCRIPT --json PATH`
# (e.g. scripts/norm_time.py, whose rows of both dtypes come from one call: set AB_DTYPES=all);
# its JSON's "rows" are keyed by "case" and "dtype". Writes LOGDIR/ab.log and LOGDIR/ab.json
# (every run's rows, by variant, dtype and round) and prints the median over rounds per row,
# variant and dtype.
set -uo pipefail
LOG=$1; BASE=$(cd "$2" && pwd); shift 2
MID_FILES=("$@")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
mkdir -p "$LOG"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.ext}
ONLY=${AB_ONLY:-^(l2_20|l2_26|l2_100|l2_74|l2_34|l2_50)$}
RUNS=/tmp/ab_runs
rm -rf "$RUNS"; mkdir -p "$RUNS"
exec > >(tee "$LOG/ab.log") 2>&1

copy_tree() {  # copy_tree DEST: the tree without .git and build outputs
  rm -rf "$1"; mkdir -p "$1"
  (cd "$ROOT" && tar cf - --exclude=./.git --exclude=./.ext --exclude=./ab_base --exclude='*.egg-info' .) |
    (cd "$1" && tar xf -)
}
declare -A DIR=([new]=$ROOT)
VARIANTS=(base)
copy_tree /tmp/ab_base
(cd "$BASE" && find . -type f) | while read -r f; do cp "$BASE/$f" "/tmp/ab_base/$f"; done
DIR[base]=/tmp/ab_base
if [ ${#MID_FILES[@]} -gt 0 ]; then
  copy_tree /tmp/ab_mid
  for f in "${MID_FILES[@]}"; do cp "$BASE/$f" "/tmp/ab_mid/$f"; done
  DIR[mid]=/tmp/ab_mid
  VARIANTS+=(mid)
fi
VARIANTS+=(new)
echo "variants: ${VARIANTS[*]}; baseline files: $(cd "$BASE" && find . -type f | tr '\n' ' ')"

build() {  # build VARIANT
  (cd "${DIR[$1]}" && PYTHONPATH="${DIR[$1]}" "$PY" - "$1" <<'EOF'
import sys, time
from ct3d_fx import _build
from pathlib import Path
csrc = _build._csrc_dir().resolve()
if csrc != (Path.cwd() / "csrc").resolve():  # an editable install maps ct3d_fx.csrc elsewhere
    raise SystemExit(f"{sys.argv[1]}: ct3d_fx finds csrc/ at {csrc}, not in {Path.cwd()}: "
                     "an editable install of ct3d_fx maps it there; run the A/B where ct3d_fx "
                     "is not installed")
t = time.perf_counter()
ok = _build.load() is not None
print(f"{sys.argv[1]}: csrc {_build._csrc_dir()}, built in {time.perf_counter() - t:.0f} s, "
      f"ok {ok}, why_not {_build.why_not()}")
raise SystemExit(0 if ok else 1)
EOF
  )
}
t0=$(date +%s)
pids=()
for v in "${VARIANTS[@]}"; do build "$v" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
echo "builds: $(( $(date +%s) - t0 )) s, rc $rc"
[ $rc -eq 0 ] || exit 1

summarize() {  # the medians so far (after each round, so a cut-off call keeps them)
  "$PY" - "$RUNS" "$LOG/ab.json" <<'EOF'
import json, statistics, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), sys.argv[2]
data = {}  # dtype -> variant -> round -> time_kernels.py rows
for p in sorted(runs.glob("*.json")):
    v, dt, r = p.stem.rsplit("_", 2)
    rows = json.loads(p.read_text())
    if isinstance(rows, dict):  # an AB_SCRIPT's JSON (scripts/norm_time.py): rows by case, dtype
        rows = [{"id": f'{x["case"]} [{x["dtype"]}]',
                 **{k: v for k, v in x.items() if k.endswith("_ms")}} for x in rows["rows"]]
    data.setdefault(dt, {}).setdefault(v, {})[r] = rows
json.dump(data, open(out, "w"), indent=1)
for dt, by_v in data.items():
    print(f"== {dt}: fused op ms, median over rounds [each round]; ratio = variant / base")
    table = {}  # (row, algo) -> variant -> [ms per round]
    for v, rounds in by_v.items():
        for r in sorted(rounds):
            for row in rounds[r]:
                for k, ms in row.items():
                    if k.endswith("_ms") and k not in ("bare_ms", "before_ms", "floor_ms"):
                        table.setdefault((row["id"], k[:-3]), {}).setdefault(v, []).append(ms)
    for (rid, algo), by in table.items():
        base = statistics.median(by["base"]) if "base" in by else None
        cells = []
        for v, ms in by.items():
            med = statistics.median(ms)
            ratio = f" x{med / base:.3f}" if base and v != "base" else ""
            cells.append(f"{v} {med:.4f}{ratio} {ms}")
        print(f"{rid:7s} {algo:9s} " + " | ".join(cells))
EOF
}

for r in $(seq 1 "${AB_ROUNDS:-2}"); do
  for dt in ${AB_DTYPES:-fp32 bf16}; do
    for v in "${VARIANTS[@]}"; do
      echo "--- round $r, $dt, $v"
      if [ -n "${AB_SCRIPT:-}" ]; then
        (cd "${DIR[$v]}" && PYTHONPATH="${DIR[$v]}" "$PY" $AB_SCRIPT \
          --json "$RUNS/${v}_${dt}_r$r.json") || echo "FAILED: round $r $dt $v"
      else
        (cd "${DIR[$v]}" && PYTHONPATH="${DIR[$v]}" "$PY" scripts/time_kernels.py \
          --algos "${AB_ALGOS:-auto}" --dtype "$dt" --only "$ONLY" \
          --warmup-ms "${AB_WARMUP_MS:-10}" --rep-ms "${AB_REP_MS:-40}" \
          --json "$RUNS/${v}_${dt}_r$r.json") || echo "FAILED: round $r $dt $v"
      fi
    done
  done
  summarize
done

