#!/usr/bin/env bash
# Issue 15's GPU runs, as stages (bench/NOTES_kernels.md "Issue 15: the next GPU call" gives the device call).
#   on the device:  bash scripts/gpu_issue15.sh prefill           (carry: ["build/libzq_kernels.so"])
#                   bash scripts/gpu_issue15.sh prefill-resume    (the next call: the rows the first one skipped)
# Results go to $OUT (the device tool's return folder): prefill_H200.json / .md, prefill.log.
# PREFILL_ARGS: more bench options, e.g. "--engine-budget-s compile-max-autotune-fp16=0" (skip max-autotune), or
# "--smoke" to check this script on a CPU machine (PY=/work/main/.venv/bin/python; writes $OUT/prefill_H200.json).
# The kernel library is carried, built here from this commit (the bench refuses one of another ABI version).
# Developer tooling, not CI.
STAGE_DEFAULT=540
source "$(dirname "$0")/gpu_common.sh"
# the bench's own row budget (seconds from its first row): BUDGET_S, cut to the stage's time less 40 s (imports,
# the kernel library and one row's overrun), so it stops choosing rows before the timeout kills it
budget() { local t; t=$(( $(left) - 40 )); [ "$t" -gt "${BUDGET_S:-470}" ] && t="${BUDGET_S:-470}";
           [ "$t" -lt 10 ] && t=10; echo "$t"; }
prefill() { timeout "$(left)" "$PY" bench/bench_e2e.py --prefill --budget-s "$(budget)" --out "$OUT/prefill_H200.json" \
              ${PREFILL_ARGS:-} "$@" 2>&1 | tee -a "$OUT/prefill.log" | grep -v -i warn; return "${PIPESTATUS[0]}"; }
rc=0
for stage in "$@"; do
  echo "== $stage $(date -u +%T)"
  case "$stage" in
    prefill)  # the whole grid in priority order; the rows past the budget are recorded as skipped
      prefill || rc=$? ;;
    prefill-resume)  # continue from the committed result of the call before (its measured rows kept)
      [ -f bench/results/prefill_H200.json ] && cp bench/results/prefill_H200.json "$OUT/prefill_H200.json"
      prefill --resume || rc=$? ;;
    w4-crossover)  # INT4 K groups: the mma kernel vs the fp16-dequant path, M = 256-8192 (MMA_KGROUP_MAX_M)
      timeout "$(left)" "$PY" bench/bench_gemm.py --w4-crossover --out "$OUT" > "$OUT/gemm_w4_crossover.log" 2>&1 || rc=$?
      tail -4 "$OUT/gemm_w4_crossover.log" ;;
    *) echo "unknown stage $stage (prefill prefill-resume w4-crossover)"; exit 2 ;;
  esac
done
exit $rc
