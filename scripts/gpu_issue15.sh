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
    profile-bert)  # BERT-base s128 b128 W8A8: the kernel table (PDL off, so each kernel's time is its own)
      ZQ_PDL=0 timeout "$(left)" "$PY" bench/profile_engine.py --model bert-base --batch 128 --seq 128 \
        > "$OUT/profile_bert_base_b128_H200.txt" 2>&1 || rc=$?
      grep -E "zq::|cutlass|Self CUDA time" "$OUT/profile_bert_base_b128_H200.txt" | cut -c1-60,100-200 | head -20 ;;
    elementwise)  # the fused producers at M = 16384 (BERT b128 rows) and 8192 x 4096: µs and GB/s
      timeout "$(left)" "$PY" bench/bench_elementwise.py --out "$OUT" || rc=$? ;;
    rows-old)  # the previous commit's row kernels alone (act_quant, norm_quant, quantize, launch, version) as
      # build/librows_old.so, from .rows_old/ (here: `rm -rf .rows_old && mkdir .rows_old && git archive REF
      # plugins_cuda | tar -x -C .rows_old`; carry it), for `rows-ab`
      (cd .rows_old/plugins_cuda/src && nvcc -shared -Xcompiler -fPIC -O3 -std=c++17 --expt-relaxed-constexpr \
        -gencode=arch=compute_90,code=sm_90 -I ../include -I . act_quant.cu norm_quant.cu quantize.cu launch.cu \
        version.cu -o "$OLDPWD/build/librows_old.so") > "$OUT/rows_old_build.log" 2>&1 ||
        { rc=1; tail -3 "$OUT/rows_old_build.log"; } ;;
    rows-tests)  # the row kernels' GPU tests (INT8 and FP8 producers, in-place halves, decode splits)
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider -n 4 \
        tests/gpu/test_kernels.py -k "quantize or norm_quant or act_quant or fp8_producers or row" \
        > "$OUT/gpu_tests_rows.txt" 2>&1 || rc=$?
      tail -2 "$OUT/gpu_tests_rows.txt" ;;
    rows-ab)  # this build's row kernels vs build/librows_old.so: interleaved, same process, bit-for-bit check
      timeout "$(left)" "$PY" bench/bench_elementwise.py --ab-lib build/librows_old.so --fp8 --out "$OUT" || rc=$? ;;
    rows-ab-decode)  # the same A/B at decode sizes (M = 1-64, the 1B shape's K = 2048 / 8192, 20 calls a graph)
      timeout "$(left)" "$PY" bench/bench_elementwise.py --decode --ab-lib build/librows_old.so --out "$OUT" || rc=$? ;;
    bert-b128)  # BERT-base s128 b128: HF eager FP16 and zq W8A8 / W4/8A8 in one process (bench_e2e)
      timeout "$(left)" "$PY" bench/bench_e2e.py --models bert-base --batches 128 --seqs 128 --compile-batches 0 \
        --torchao-batches 0 --configs w8a8,w4/8a8 --out "$OUT/e2e_bert_b128_H200.json" 2>&1 | grep -v -i warn
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    wgmma-tests)  # the Hopper K-group GEMM (gemm_wgmma.cu): against the mma kernel's bits and the reference
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        tests/gpu/test_gemm_wgmma.py > "$OUT/gpu_tests_wgmma.txt" 2>&1 || rc=$?
      tail -3 "$OUT/gpu_tests_wgmma.txt" ;;
    wgmma-bench)  # its table at large M (WGMMA_MS: the M, comma-separated) vs mma / fp16 dequant / W8A8 / fp16
      timeout "$(left)" "$PY" bench/bench_gemm.py --wgmma --ms "${WGMMA_MS:-}" --out "$OUT" \
        > "$OUT/gemm_wgmma.log" 2>&1 || rc=$?
      tail -3 "$OUT/gemm_wgmma.log" ;;
    bert-b128-wgmma)  # BERT-base s128 b128 W4/8A8 with the wgmma kernel on (auto policy) and off, one process each
      for mode in auto 0; do
        ZQ_GEMM_WGMMA=$mode timeout "$(left)" "$PY" bench/bench_e2e.py --models bert-base --batches 128 --seqs 128 \
          --compile-batches 0 --torchao-batches 0 --configs w8a8,w4/8a8 \
          --out "$OUT/e2e_bert_b128_wgmma_${mode}_H200.json" 2>&1 | grep -v -i warn | tail -6
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      done ;;
    prefill-8b-wgmma)  # Llama-3-8B prefill, 2048 tokens, batch 1: W8A8 and W4/8A8 with the wgmma kernel's policy
      ZQ_GEMM_WGMMA=${WGMMA_MODE:-auto} prefill --models llama-3-8b --engines zq-w8a8,zq-w4/8a8 --llama-batches 1 \
        --out "$OUT/prefill_8b_wgmma_H200.json" || rc=$? ;;
    two-level-tests)  # the two-level W4 path (unpack kernel + the INT8 GEMM): kernel bits, routing, an engine
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        tests/gpu/test_gemm_two_level.py tests/plugins/test_gemm_kernels.py > "$OUT/gpu_tests_two_level.txt" 2>&1 ||
        rc=$?
      tail -3 "$OUT/gpu_tests_two_level.txt" ;;
    bert-b128-2l)  # BERT-base s128 b128: W8A8, W4/8A8 (two-level scales) and W4/8A8 with fp32 scales, one process
      timeout "$(left)" "$PY" bench/bench_e2e.py --models bert-base --batches 128 --seqs 128 --compile-batches 0 \
        --torchao-batches 0 --configs w8a8,w4/8a8,w4/8a8-fp32 --out "$OUT/e2e_bert_b128_2l_H200.json" 2>&1 |
        grep -v -i warn | tail -8
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    prefill-8b-2l)  # Llama-3-8B prefill, 2048 tokens: W8A8, W4/8A8 and W4/8A8 with fp32 scales (LLAMA_BATCHES: 1)
      prefill --models llama-3-8b --engines zq-w8a8,zq-w4/8a8,zq-w4/8a8-fp32 --llama-batches "${LLAMA_BATCHES:-1}" \
        --out "$OUT/prefill_8b_2l_H200.json" || rc=$? ;;
    *) echo "unknown stage $stage (prefill prefill-resume w4-crossover profile-bert elementwise rows-old rows-tests" \
            "rows-ab rows-ab-decode bert-b128 wgmma-tests wgmma-bench bert-b128-wgmma prefill-8b-wgmma" \
            "two-level-tests bert-b128-2l prefill-8b-2l)"; exit 2 ;;
  esac
done
exit $rc
