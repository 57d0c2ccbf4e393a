# Sourced by scripts/gpu_issue*.sh (device-call stages): the repo root as the working folder, $OUT (the device
# tool's return folder; /tmp/zq_out elsewhere), $PY, and left(): the seconds a stage may run, STAGE_TIMEOUT
# (default $STAGE_DEFAULT) cut to what is left before DEADLINE (epoch seconds, optional), at least 5.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/zq_out}"
mkdir -p "$OUT"
PY="${PY:-python}"  # the GPU image: `python` is the torch one (FACTS.md)
left() { local t="${STAGE_TIMEOUT:-${STAGE_DEFAULT:-560}}"; if [ -n "${DEADLINE:-}" ]; then
         local d=$((DEADLINE - $(date +%s))); [ "$d" -lt "$t" ] && t=$d; fi; [ "$t" -lt 5 ] && t=5; echo "$t"; }
