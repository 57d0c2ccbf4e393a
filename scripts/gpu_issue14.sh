#!/usr/bin/env bash
# Issue 14 item 3's GPU run (LKD on the GPU, perplexity of SmolLM2-135M, bench/accuracy/README.md "LKD on the GPU").
#   here, first:    bash scripts/gpu_issue14.sh pack        (fills .carry14/, git-ignored via .git/info/exclude)
#   on the device:  bash scripts/gpu_issue14.sh smol-part1  (call A, carry: [".carry14/part1"])
#                   bash scripts/gpu_issue14.sh smol lkd    (call B right after, same warm machine,
#                                                            carry: [".carry14/part2"])
# The GGUF (94 MiB) and the kernel library (35 MiB; 13 MiB gzipped) exceed one call's 64 MiB of carried files,
# so the GGUF travels in two parts; part 1 waits in /tmp/zq_smol between the calls. part2 also holds the gguf
# wheel (pure Python; the device image lacks only it: numpy, pyyaml, tqdm, requests are there) and the gzipped
# kernel library, which `smol` installs as build/libzq_kernels.so (unless one is there) for the stages after it.
# Results go to $OUT: accuracy_gpu/accuracy_engine.json / .md, lkd.log, gpu_lkd_test.txt.
# Item 2's FP8 kernels (after scripts/gpu_issue13.sh build, same warm machine; no carry):
#   bash scripts/gpu_issue14.sh fp8-tests      the GPU tests (every row kernel, the FP8 ones) + the producer table
#   bash scripts/gpu_issue14.sh fp8-engines    FP8 engines vs W8A8: BERT-base / 8B prefill with the Hopper FP8 GEMM
#                                              (ZQ_GEMM_SM90_FP8=1) and with scaled_mm (=0); 1B decode
#   bash scripts/gpu_issue14.sh fp8-decode     1B decode: fp8 (the decode kernel's E4M3 path) vs w8a8 vs FP16
# CPU check: PY=/work/main/.venv/bin/python SMOL_DIR=/tmp/x LKD_DEVICE=cpu LKD_ARGS="--max-eval-tokens 1024" ...
# Developer tooling, not CI.
STAGE_DEFAULT=200  # the lkd stage's share of the device call (STAGE_TIMEOUT or DEADLINE: another)
source "$(dirname "$0")/gpu_common.sh"
CARRY="${CARRY:-.carry14}"  # relative to the repo root: carried paths land there on the device
SMOL_DIR="${SMOL_DIR:-/tmp/zq_smol}"
GGUF="$SMOL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
PART1_MIB="${PART1_MIB:-54}"  # part1 + the tree ~56 MiB, part2 (the rest, the wheel, the library) ~54 MiB
SITE="${SITE:-/tmp/zq_site}"
# LKD rows' order: the references first (fast on the GPU), then LKD on text, random tokens, generated data
ROWS="${ROWS:-fp32,w4/8a8,w4/8a8 + LKD(text),w4/8a8 + LKD(random),w4/8a8 + LKD(generated)}"
sha() { sha256sum "$1" | cut -d' ' -f1; }
pack() {  # here: the GGUF in two parts + its sha256, the gguf wheel, the kernel library gzipped (+ its sha256)
  local src lib="${LIB:-build/libzq_kernels.so}" ver
  src="$("$PY" -c 'from zqcompile.models import packaged_path; print(packaged_path("smollm2"))')" || return 1
  ver="$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" || return 1
  [ "$lib" = none ] || [ -f "$lib" ] || { echo "no $lib: build it (cmake), set LIB, or LIB=none (built on the device)"; return 1; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/part1" "$CARRY/part2/whl" || return 1
  head -c $((PART1_MIB * 1024 * 1024)) "$src" > "$CARRY/part1/smol.gguf.part1"
  tail -c +$((PART1_MIB * 1024 * 1024 + 1)) "$src" > "$CARRY/part2/smol.gguf.part2"
  echo "$(sha "$src")  $(basename "$GGUF")" > "$CARRY/part2/smol.gguf.sha256"
  [ "$lib" = none ] || { gzip -c "$lib" > "$CARRY/part2/libzq_kernels.so.gz" &&
    echo "$(sha "$lib")  libzq_kernels.so" > "$CARRY/part2/libzq_kernels.so.sha256"; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
    -d "$CARRY/part2/whl" "gguf==$ver" || return 1
  du -sh "$CARRY"/part1 "$CARRY"/part2; }
install_lib() {  # the carried library as build/libzq_kernels.so, unless one is there already (carried on purpose)
  local want got; want=$(cut -d' ' -f1 "$CARRY/part2/libzq_kernels.so.sha256")
  if [ -f build/libzq_kernels.so ]; then
    got=$(sha build/libzq_kernels.so)
    [ "$got" = "$want" ] && echo "build/libzq_kernels.so: already there, sha256 ok" ||
      echo "build/libzq_kernels.so: kept the one there (sha256 $got), not the packed one ($want)"
    return 0; fi
  mkdir -p build && gzip -dc "$CARRY/part2/libzq_kernels.so.gz" > build/libzq_kernels.so.tmp || return 1
  got=$(sha build/libzq_kernels.so.tmp)
  [ "$got" = "$want" ] || { echo "sha256 of the unpacked library is $got, expected $want"; return 1; }
  mv build/libzq_kernels.so.tmp build/libzq_kernels.so && echo "build/libzq_kernels.so: installed, sha256 ok"; }
rc=0
for stage in "$@"; do
  echo "== $stage $(date -u +%T)"
  case "$stage" in
    pack)
      pack || { echo "pack failed"; exit 1; } ;;
    smol-part1)  # call A: the GGUF's first part waits in $SMOL_DIR for call B
      mkdir -p "$SMOL_DIR" && cp "$CARRY/part1/smol.gguf.part1" "$SMOL_DIR/" ||
        { echo "no $CARRY/part1 carried"; exit 1; }
      ls -l "$SMOL_DIR" ;;
    smol)  # call B: the whole GGUF (sha256 checked), the gguf wheel, the kernel library
      [ -f "$SMOL_DIR/smol.gguf.part1" ] ||
        { echo "no $SMOL_DIR/smol.gguf.part1: run stage smol-part1 first (call A)"; exit 1; }
      [ -f "$CARRY/part2/smol.gguf.part2" ] || { echo "no $CARRY/part2 carried"; exit 1; }
      cat "$SMOL_DIR/smol.gguf.part1" "$CARRY/part2/smol.gguf.part2" > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"
      want=$(cut -d' ' -f1 "$CARRY/part2/smol.gguf.sha256"); got=$(sha "$GGUF")
      [ "$got" = "$want" ] ||
        { echo "sha256 of $GGUF is $got, expected $want: the parts do not match"; rm -f "$GGUF"; exit 1; }
      echo "$GGUF: sha256 ok"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$CARRY"/part2/whl/*.whl || { echo "gguf wheel install failed"; exit 1; }
      export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
      "$PY" -c 'import gguf; print("gguf", gguf.__file__)' || exit 1
      [ -f "$CARRY/part2/libzq_kernels.so.gz" ] && { install_lib || exit 1; } ;;
    lkd)  # the CUDA-only LKD test, then the perplexity rows on the GPU (engine path, fp32 model)
      [ -f "$GGUF" ] || { echo "no $GGUF: run stage smol first"; exit 1; }
      export ZQ_CUDA_LIB="${ZQ_CUDA_LIB:-$PWD/build/libzq_kernels.so}"
      t0=$(date +%s); t=$(left)
      timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_lkd.py -k gpu > "$OUT/gpu_lkd_test.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_lkd_test.txt"; [ $r -eq 0 ] || rc=$r
      t=$((t - ($(date +%s) - t0))); [ "$t" -lt 5 ] && t=5
      budget=$((t - 20)); [ "$budget" -lt 10 ] && budget=10  # the bench's clock starts after python's start
      PYTHONUNBUFFERED=1 timeout "$t" "$PY" bench/accuracy/run.py --model "$GGUF" --path engine \
        --device "${LKD_DEVICE:-cuda}" --threads "${THREADS:-8}" --rows "$ROWS" --time-budget-s "$budget" \
        --out "$OUT/accuracy_gpu" ${LKD_ARGS:-} 2>&1 | tee "$OUT/lkd.log" | grep -v -i warn
      r=${PIPESTATUS[0]}; [ $r -eq 0 ] || { echo "run.py exited $r"; rc=$r; } ;;
    fp8-tests)
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} tests/gpu tests/plugins/test_gemm_sm90_fp8.py \
        > "$OUT/gpu_tests_fp8_producers.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_fp8_producers.txt"; [ $r -eq 0 ] || rc=$r
      timeout "$(left)" "$PY" bench/bench_elementwise.py --fp8 --out "$OUT" > "$OUT/elementwise_fp8.log" 2>&1 || rc=$?
      tail -14 "$OUT/elementwise_fp8.log" ;;
    fp8-engines)
      for gate in 1 0; do
        engines=zq-fp8; [ $gate = 1 ] && engines=zq-w8a8,zq-fp8
        ZQ_GEMM_SM90_FP8=$gate timeout "$(left)" "$PY" bench/bench_e2e.py --prefill --models bert-base,llama-3-8b \
          --engines "$engines" --seqs 128 --batches 1,16,128 --llama-batches 1 --budget-s "${FP8_BUDGET_S:-200}" \
          --out "$OUT/prefill_fp8_gate${gate}_H200.json" 2>&1 | tee -a "$OUT/prefill_fp8.log" | grep -v -i warn
        r=${PIPESTATUS[0]}; [ $r -eq 0 ] || rc=$r
      done
      ZQ_GEMM_SM90_FP8=1 timeout "$(left)" "$PY" bench/bench_decode_scale.py --shapes 1b --engines w8a8,fp8 \
        --batches 1,16 --cache-lens 128 --repeat 2 --out "$OUT/decode_scale_1b_fp8_H200.json" || rc=$? ;;
    fp8-decode)  # FP8 decode with the decode kernel's E4M3 path against W8A8, the 1B shape
      timeout "$(left)" "$PY" bench/bench_decode_scale.py --shapes 1b --engines w8a8,fp8,none --batches 1,16 \
        --cache-lens 128 --repeat 2 --out "$OUT/decode_scale_1b_fp8_skinny_H200.json" || rc=$? ;;
    *) echo "unknown stage $stage (pack smol-part1 smol lkd fp8-tests fp8-engines fp8-decode)"; exit 2 ;;
  esac
done
exit $rc
