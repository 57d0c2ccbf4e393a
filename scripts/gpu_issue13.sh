#!/usr/bin/env bash
# Issue 13's GPU runs, as stages; each device call runs a few of them (bench/NOTES_kernels.md gives the calls).
#   here, once:        bash scripts/gpu_issue13.sh stage        (CUTLASS headers into build-cutlass/, git-ignored)
#   on the device:     bash scripts/gpu_issue13.sh build tests kernels     (carry: ["build-cutlass"])
#                      bash scripts/gpu_issue13.sh 8b-fp16-w8a8 | 1b | 8b-w4-hf
# Results go to $OUT (the device tool's return folder): build.log, gpu_tests.txt, decode_*.json / .md.
# Developer tooling, not CI. Stages after `build` reuse build/ (kept on a warm machine between calls).
STAGE_DEFAULT=560
source "$(dirname "$0")/gpu_common.sh"
bench() { timeout "$(left)" "$PY" bench/bench_decode_scale.py "$@"; }
rc=0
for stage in "$@"; do
  echo "== $stage $(date -u +%T)"
  case "$stage" in
    stage)
      src="$("${PY}" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))')"
      rm -rf build-cutlass && mkdir -p build-cutlass/tools/util
      cp -r "$src/include" build-cutlass/ && cp -r "$src/tools/util/include" build-cutlass/tools/util/
      du -sh build-cutlass ;;
    build)
      { cmake -S . -B build -DCUTLASS_DIR="$PWD/build-cutlass" -DZQ_GENERIC_ARCHS=90 &&
        cmake --build build -j "$(nproc)"; } > "$OUT/build.log" 2>&1
      r=$?; tail -5 "$OUT/build.log"; [ $r -eq 0 ] || { echo "build failed ($r)"; exit $r; } ;;
    tests)
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} \
        tests/gpu/test_decode_attention_split.py tests/gpu tests/plugins/test_gemm_kernels.py > "$OUT/gpu_tests.txt" 2>&1
      r=$?; tail -5 "$OUT/gpu_tests.txt"; [ $r -eq 0 ] || rc=$r ;;
    kernels)  # decode GEMM table + decode attention (split-L vs single block)
      bench --gemm-only --attn --out "$OUT/decode_kernels_H200.json" || rc=$? ;;
    attn)  # the decode-attention table alone
      bench --attn-only --out "$OUT/decode_attention_H200.json" || rc=$? ;;
    attn-sweep)  # split-L variants: split counts, the earlier rule, the combine kernel (caches read from HBM)
      bench --attn-only --batches ${SWEEP_BATCHES:-1,4,16,64} --attn-cache-lens ${SWEEP_LENS:-128,512,2048,4096,8192} \
        --attn-variants "${SWEEP_VARIANTS:-auto,old,s8,s16,s32,s64}" \
        --out "$OUT/decode_attention_sweep_H200.json" || rc=$? ;;
    1b)
      bench --shapes 1b --out "$OUT/decode_scale_1b_H200.json" || rc=$? ;;
    8b-fp16-w8a8)
      bench --shapes 8b --engines none,w8a8 --out "$OUT/decode_scale_8b_a_H200.json" || rc=$? ;;
    8b-w4-hf)
      bench --shapes 8b --engines w4/8a8,hf-static-compile --out "$OUT/decode_scale_8b_b_H200.json" || rc=$? ;;
    profile-8b)  # one decode step's kernels at a 2K cache (where the non-GEMM time goes)
      timeout "$(left)" "$PY" bench/profile_decode.py --shape 8b --cache-len 2048 --configs ${PROFILE_CONFIGS:-none w8a8} \
        --batches 1 16 --no-gemm --out "$OUT/profile_decode_8b_H200.json" > "$OUT/profile_decode_8b_H200.md" 2>&1 || rc=$? ;;
    streaming-8b)  # issue 17: the 8B shape compiled from a safetensors folder under a GPU memory cap
      timeout "$(left)" "$PY" bench/streaming_8b.py --folder /tmp/zq_8b_folder \
        --out "$OUT/streaming_8b_H200.json" > "$OUT/streaming_8b_H200.txt" 2>&1 || rc=$? ;;
    rope-kv)  # the fused RoPE + KV-cache write kernel: its GPU tests, then 8B W8A8 decode with it (A/B: split)
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        tests/gpu/test_rope_kv_gpu.py > "$OUT/gpu_tests_rope_kv.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_rope_kv.txt"
      if [ $r -eq 0 ]; then
        for path in fused split; do
          ZQ_ROPE_KV=$path bench --shapes 8b --engines w8a8 --batches 1,16 --cache-lens 128 --repeat 2 \
            --out "$OUT/decode_scale_8b_rope_kv_${path}_H200.json" || rc=$?
        done
      else rc=$r; fi ;;
    row-split)  # the row kernels with a decode row split over a cluster: their GPU tests, the kernel table, then
                # 8B and 1B decode (W8A8 and FP16) with it
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} tests/gpu/test_kernels.py tests/gpu/test_generation_gpu.py \
        tests/gpu/test_rope_kv_gpu.py > "$OUT/gpu_tests_row_split.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_row_split.txt"
      if [ $r -eq 0 ]; then
        timeout "$(left)" "$PY" bench/bench_elementwise.py --decode --out "$OUT" || rc=$?
        bench --shapes 8b --engines none,w8a8 --batches 1,16 --cache-lens 128 --repeat 2 \
          --out "$OUT/decode_scale_8b_row_split_H200.json" || rc=$?
        bench --shapes 1b --engines none,w8a8 --batches 1,16 --cache-lens 128 --repeat 2 \
          --out "$OUT/decode_scale_1b_row_split_H200.json" || rc=$?
      else rc=$r; fi ;;
    row-split-ab)  # A/B for row-split: 8B W8A8 with one block a row
      ZQ_ROW_SPLIT=0 bench --shapes 8b --engines w8a8 --batches 1,16 --cache-lens 128 --repeat 2 \
        --out "$OUT/decode_scale_8b_row_block_H200.json" || rc=$? ;;
    wgmma)  # skinny configuration 4 (sm_90a wgmma, 64 weight rows x 64 tokens an instruction): its GPU tests,
            # then the decode GEMM table for the kernels it competes with
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} tests/gpu/test_gemm_skinny.py > "$OUT/gpu_tests_wgmma.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_wgmma.txt"
      if [ $r -eq 0 ] || [ -n "${BENCH_ANYWAY:-}" ]; then
        timeout "$(left)" "$PY" bench/bench_gemm.py --decode --ms ${WG_MS:-1,16,32,64} \
          --kernels sm90,skinny0,skinny2,skinny4 --out "$OUT" > "$OUT/gemm_decode_wgmma.log" 2>&1 || rc=$?
        tail -3 "$OUT/gemm_decode_wgmma.log"
      fi
      [ $r -eq 0 ] || rc=$r ;;
    wgmma-engines)  # 8B W4/8A8 at batch 16 / 64 with the library's pick, then configuration 4 forced (A/B, one call)
      for c in -1 4; do
        ZQ_SKINNY_CONFIG=$c bench --shapes 8b --engines ${WG_ENGINES:-w4/8a8} --batches ${WG_BATCHES:-16,64} \
          --cache-lens 128 --repeat 2 --out "$OUT/decode_scale_8b_skinny_cfg${c}_H200.json" || rc=$?
      done ;;
    skinny)  # the decode-shaped GEMM kernel: its GPU tests, every kernel forced on the decode shapes, then the 1B
             # engines with the chooser taking it (ZQ_GEMM_SKINNY=1) and without (A/B, same call)
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} tests/gpu/test_gemm_skinny.py > "$OUT/gpu_tests_skinny.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_skinny.txt"
      if [ $r -eq 0 ]; then
        timeout "$(left)" "$PY" bench/bench_gemm.py --decode --out "$OUT" > "$OUT/gemm_decode.log" 2>&1 || rc=$?
        tail -3 "$OUT/gemm_decode.log"; rm -f "$OUT/gemm_decode.log"
        for on in 1 0; do
          ZQ_GEMM_SKINNY=$on bench --shapes 1b --engines w8a8,w4/8a8 --batches 1,16 --cache-lens 128 --repeat 2 \
            --out "$OUT/decode_scale_1b_skinny${on}_H200.json" || rc=$?
          rm -f "$OUT/decode_scale_1b_skinny${on}_H200.md"  # the JSON holds the rows (8 files come back a call)
        done
      else rc=$r; fi ;;
    8b-skinny | 1b-skinny)  # the engines with the decode-shaped kernel as the chooser has it, each zq row A/B'd
                            # in the same process (kernel off / on, decode graphs re-captured)
      shape=${stage%%-*}
      bench --shapes "$shape" --engines none,w8a8,w4/8a8 --batches 1,16 --cache-lens 128 --repeat 2 --ab-skinny \
        --out "$OUT/decode_scale_${shape}_skinny_H200.json" || rc=$? ;;
    gemm-decode)  # every kernel forced on the decode GEMMs (VARIANTS: int8,int4g128 by default; int4, int8g128)
      timeout "$(left)" "$PY" bench/bench_gemm.py --decode --variants "${VARIANTS:-int8,int4g128}" --out "$OUT" \
        > "$OUT/gemm_decode.log" 2>&1 || rc=$?
      tail -3 "$OUT/gemm_decode.log"; rm -f "$OUT/gemm_decode.log" ;;
    tests-skinny)  # the GPU tests the decode-shaped kernel's choice touches
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} tests/gpu/test_gemm_skinny.py tests/gpu/test_kernels.py \
        tests/gpu/test_generation_gpu.py tests/gpu/test_rope_kv_gpu.py > "$OUT/gpu_tests_skinny_policy.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_skinny_policy.txt"; [ $r -eq 0 ] || rc=$r ;;
    lib-out)  # the built library back through $OUT, gzipped in parts of 12 MiB (16 MiB a file comes back)
      gzip -c build/libzq_kernels.so | split -b 12M - "$OUT/libzq_kernels.so.gz.part" && ls -l "$OUT"/libzq_kernels.so.gz.part* ;;
    lib-in)  # a library returned by lib-out, its parts carried back in libparts/
      mkdir -p build && cat libparts/libzq_kernels.so.gz.part* | gzip -dc > build/libzq_kernels.so && ls -l build/libzq_kernels.so ;;
    tests-pdl)  # programmatic dependent launch: its bit-for-bit test, then the kernel / generation tests under it
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} tests/gpu/test_pdl_gpu.py tests/gpu/test_kernels.py \
        tests/gpu/test_generation_gpu.py tests/gpu/test_rope_kv_gpu.py tests/gpu/test_gemm_skinny.py \
        tests/gpu/test_decode_attention_split.py tests/gpu/test_fp8_gemm_sm90.py > "$OUT/gpu_tests_pdl.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_pdl.txt"; [ $r -eq 0 ] || rc=$r ;;
    8b-pdl | 1b-pdl)  # the engines with PDL as the library has it, each zq row A/B'd in the same process (off / on)
      shape=${stage%%-*}
      bench --shapes "$shape" --engines ${PDL_ENGINES:-none,w8a8,w4/8a8} --batches ${PDL_BATCHES:-1,16} --cache-lens 128 \
        --repeat 2 --ab-pdl --out "$OUT/decode_scale_${shape}_pdl_H200.json" || rc=$? ;;
    act-strided)  # act_quant reading the fused gate/up halves in place: its GPU tests, then 8B / 1B W8A8 A/B
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        tests/gpu/test_kernels.py -k "act_quant or row_kernels" > "$OUT/gpu_tests_act_strided.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_act_strided.txt"
      if [ $r -eq 0 ]; then
        for shape in 8b 1b; do
          bench --shapes $shape --engines w8a8 --batches 1,16,64 --cache-lens 128 --repeat 2 --ab-act-strided \
            --out "$OUT/decode_scale_${shape}_act_strided_H200.json" || rc=$?
        done
      else rc=$r; fi ;;
    tests-prefetch-merge)  # the decode GEMMs' L2 weight prefetch and split-L's merge in the cluster: their tests,
                           # then the kernel / attention / generation tests they touch
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} tests/gpu/test_gemm_prefetch.py \
        tests/gpu/test_decode_attention_split.py tests/gpu/test_gemm_skinny.py tests/gpu/test_pdl_gpu.py \
        tests/gpu/test_generation_gpu.py tests/gpu/test_attention_kernels.py > "$OUT/gpu_tests_prefetch_merge.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_prefetch_merge.txt"; [ $r -eq 0 ] || rc=$r ;;
    8b-ab | 1b-ab)  # each zq row A/B'd in the same process: GEMM prefetch none / half the L2 / every block, and
                    # split-L's merge by the combine kernel / in the cluster
      shape=${stage%%-*}
      bench --shapes "$shape" --engines ${AB_ENGINES:-w8a8} --batches ${AB_BATCHES:-1,16,64} --cache-lens 128 \
        --repeat 2 --ab-prefetch --ab-merge --out "$OUT/decode_scale_${shape}_prefetch_merge_H200.json" || rc=$? ;;
    tests-attn)  # split-L's tests (the split rule, the 16-block cluster merge) and generation with it
      ZQ_CUDA_LIB="$PWD/build/libzq_kernels.so" timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider \
        ${TEST_WORKERS:+-n "$TEST_WORKERS" --dist loadfile} tests/gpu/test_decode_attention_split.py \
        tests/gpu/test_attention_kernels.py tests/gpu/test_generation_gpu.py > "$OUT/gpu_tests_attn.txt" 2>&1
      r=$?; tail -3 "$OUT/gpu_tests_attn.txt"; [ $r -eq 0 ] || rc=$r ;;
    8b-attn-ab | 1b-attn-ab)  # a 4K cache: split-L's split rule (earlier / current), same engine
      shape=${stage%%-*}
      bench --shapes "$shape" --engines ${AB_ENGINES:-w8a8} --batches ${AB_BATCHES:-1,4,16} --cache-lens 4096 \
        --repeat 1 --ab-attn-rule --out "$OUT/decode_scale_${shape}_attn_ab_H200.json" || rc=$? ;;
    8b-single)  # A/B: the engines with the old single-block decode attention
      bench --shapes 8b --engines w8a8 --batches 1,16 --attention single \
        --out "$OUT/decode_scale_8b_single_H200.json" || rc=$? ;;
    *) echo "unknown stage $stage (stage build tests kernels attn profile-8b 1b 8b-fp16-w8a8 8b-w4-hf 8b-single" \
            "streaming-8b rope-kv row-split row-split-ab skinny 8b-skinny 1b-skinny gemm-decode tests-skinny lib-out lib-in" \
            "tests-pdl 8b-pdl 1b-pdl act-strided tests-prefetch-merge 8b-ab 1b-ab attn-sweep tests-attn 8b-attn-ab 1b-attn-ab)"; exit 2 ;;
  esac
done
exit $rc
