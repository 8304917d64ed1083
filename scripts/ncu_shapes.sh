#!/usr/bin/env bash
# Nsight Compute on suite shapes, one launch each (scripts/profile_shapes.py), clocks left alone.
#
#   scripts/ncu_shapes.sh OUTDIR [ID:ALGO[:CONFIG] ...]     # default: l2_3 with igemm 10 and 11
#
# Writes OUTDIR/ncu_sections.txt (speed of light, occupancy, launch, warp state, scheduler,
# memory and compute workload, instruction statistics for the pack and GEMM kernels) and
# OUTDIR/ncu_source.csv.gz (per source line and SASS instruction: stall samples, L2 sectors) for
# the first spec. The v10 figures in docs/performance.md and docs/kernel.md come from it.
set -u
OUT_DIR=${1:?usage: scripts/ncu_shapes.sh OUTDIR [ID:ALGO[:CONFIG] ...]}
shift
SPECS=("$@")
[ ${#SPECS[@]} -gt 0 ] || SPECS=(l2_3:igemm:10 l2_3:igemm:11)
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ct3d_fx_extensions}
python3 -c "from ct3d_fx import _build; _build.load()" || exit 1
ncu --clock-control none -k regex:"conv_transpose3d_|pack_input" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section InstructionStats \
  python3 scripts/profile_shapes.py "${SPECS[@]}" >"$OUT_DIR/ncu_sections.txt" 2>&1
echo "sections: exit $?"
ncu --clock-control none -k regex:"conv_transpose3d_" --launch-count 1 \
  --section SourceCounters --page source --print-source cuda,sass --csv \
  python3 scripts/profile_shapes.py "${SPECS[0]}" >"$OUT_DIR/ncu_source.csv" 2>"$OUT_DIR/ncu_source.err"
echo "source: exit $?"
gzip -f "$OUT_DIR/ncu_source.csv"
