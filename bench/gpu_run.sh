#!/usr/bin/env bash
# On the GPU machine (see ../shared/gpu/README.md): install the carried wheels, then run what is asked.
#   bash bench/gpu_run.sh tiny        # the whole flow, tiny recipe, on CUDA
#   bash bench/gpu_run.sh bench       # python -m bench.throughput
#   bash bench/gpu_run.sh flow7b N    # the whole flow on the random-weight Mistral-7B architecture, N steps
#   bash bench/gpu_run.sh sigterm7b   # SIGTERM in the 7B recipe's training: seconds to a checkpoint and exit; resume
#   bash bench/gpu_run.sh dpo         # python -m bench.dpo: DPO training tok/s of the 7B QLoRA path
#   bash bench/gpu_run.sh format7b    # the format stage's seconds in the 7B flow, with and without the stand-in's build
#   bash bench/gpu_run.sh levers      # issue 14's LoRA-glue levers: the default against peft's forward and masks
#                                     # and each lever alone, alternating (~8 min)
#   bash bench/gpu_run.sh job         # issue 14's item 4: the seed's whole job at its size (10,400 + 2,300
#                                     # ultrachat-like conversations, the recipe as it is), seconds per stage;
#                                     # ~21 min on an H200: longer than one 10-minute device call, so start it
#                                     # detached (setsid) from a copy of the tree outside the one the next call
#                                     # replaces, and watch it over several calls
set -uo pipefail
bash .whl/install.sh >/dev/null && export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, peft, bitsandbytes, prefect; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'prefect', prefect.__version__)"
SEVEN=(--recipe mistral-7b-qlora --set model.source=build --set model.name=mistral-7b --set model.requires_token=false
       --set data.source=synthetic --set data.synthetic_style=long --set data.synthetic_train_rows=1500
       --set data.synthetic_test_rows=64 --set data.train_subset.fraction=null --set data.test_subset.fraction=null)
for what in "$@"; do
  case "$what" in
    sigterm7b)  # the 7B recipe's effective batch (128 rows a step): SIGTERM after step 2, seconds to exit, the
                # checkpoint; then the same command resumes (IFBench on 64 prompts in the benchmark stage, timed)
      args=(run "${SEVEN[@]}" --store /dev/shm/store-sig --set training.max_steps=5 --set training.save_steps=100
            --set training.logging_steps=1 --set training.eval_strategy=no --set generation.max_new_tokens=16)
      python3 -m sft_pipeline.cli "${args[@]}" --summary-json "$OUT/sig1.json" > "$OUT/sig1.log" 2>&1 &
      pid=$!
      until grep -q "train: step 2/" "$OUT/sig1.log" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.5; done
      t0=$(date +%s.%N); kill -TERM $pid; wait $pid; rc=$?; t1=$(date +%s.%N)
      python3 -c "print(f'sigterm: exit code $rc, {$t1 - $t0:.1f} s after SIGTERM')"
      grep -E "^error:|saved checkpoint|train: step" "$OUT/sig1.log" | tail -4
      ls -d /dev/shm/store-sig/.work/train/*/checkpoint-* 2>/dev/null
      python3 -m sft_pipeline.cli "${args[@]}" --set benchmark.tasks=[ifbench] --set benchmark.limit=64 \
          --set benchmark.max_new_tokens=256 --set benchmark.batch_size=64 --summary-json "$OUT/sig2.json" \
          > "$OUT/sig2.log" 2>&1; echo "resumed run: exit code $?"; tail -14 "$OUT/sig2.log"
      python3 -c "import json; s = json.load(open('$OUT/sig2.json')); print({k: (v['state'], v['seconds']) for k, v in s['stages'].items()}, 'resumed_from_step', s.get('train', {}).get('resumed_from_step'))" ;;
    format7b)  # issue 32: the format stage's seconds inside the flow, on the quarter job's data (2,600 + 575 long
               # conversations): first on an empty store (the stand-in 7B base is built by the first stage that
               # needs it: format), then again with the base built (format.system_message changed: format recomputes,
               # the model's key does not); each run stopped with SIGTERM when training starts
      for n in 1 2; do
        extra=(); [ $n = 2 ] && extra=(--set "format.system_message=You are a helpful assistant.")
        python3 -m sft_pipeline.cli run "${SEVEN[@]}" --store /dev/shm/store-fmt --set data.synthetic_train_rows=2600 \
            --set data.synthetic_test_rows=575 "${extra[@]}" --summary-json "$OUT/fmt$n.json" > "$OUT/fmt$n.log" 2>&1 &
        pid=$!
        until grep -q "train: computing" "$OUT/fmt$n.log" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
        kill -TERM $pid; wait $pid
        grep -E "^(data|format|train): (computing|reusing)|Finished in state|^error" "$OUT/fmt$n.log" | head -8
        python3 -c "import json; s = json.load(open('$OUT/fmt$n.json')); print('run $n', {k: (v['state'], v['seconds']) for k, v in s['stages'].items() if k in ('authenticate', 'data', 'format')})"
      done
      du -sh /dev/shm/store-fmt/models ;;
    dpo) python3 -m bench.dpo --runs ${RUNS:-2} --out "$OUT" 2>&1 | tail -12 ;;
    tiny) python3 -m sft_pipeline.cli run --recipe tiny --store /dev/shm/store --set training.device=cuda \
            --summary-json "$OUT/summary-tiny-cuda.json" 2>&1 | tee "$OUT/tiny.log" | tail -25 ;;
    bench) python3 -m bench.throughput --out "$OUT" --runs ${RUNS:-2} --settings ${SETTINGS:-notebook,liger2,project,project-flex} 2>&1 | tail -30 ;;
    levers) python3 -m bench.throughput --out "$OUT" --budget-s 420 \
            --order project,peftlora,sharedrop,addmm,splita,project,peftlora,project,peftlora 2>&1 | tail -14 ;;
    flow7b) python3 -m sft_pipeline.cli run --recipe mistral-7b-qlora --store /dev/shm/store \
            --set model.source=build --set model.name=mistral-7b --set model.requires_token=false \
            --set data.source=synthetic --set data.synthetic_style=long --set data.synthetic_train_rows=1500 \
            --set data.synthetic_test_rows=64 --set data.train_subset.fraction=null --set data.test_subset.fraction=null \
            --set training.max_steps=${STEPS:-60} --set training.gradient_accumulation_steps=8 \
            --set training.eval_strategy=no --set training.save_steps=30 --set training.logging_steps=10 \
            --set generation.max_new_tokens=32 --set training.price_per_hour=2.5 \
            --summary-json "$OUT/summary-7b.json" 2>&1 | tee "$OUT/flow7b.log" | tail -25 ;;
    job) python3 -m sft_pipeline.cli run --recipe mistral-7b-qlora --store /dev/shm/store \
            --set model.source=build --set model.name=mistral-7b --set model.requires_token=false \
            --set data.source=synthetic --set data.synthetic_style=long --set data.synthetic_train_rows=10400 \
            --set data.synthetic_test_rows=2300 --set data.train_subset.fraction=null \
            --set data.test_subset.fraction=null --set training.price_per_hour=2.5 \
            --summary-json "$OUT/summary-job.json" 2>&1 | tee "$OUT/job.log" | tail -25
          python3 -c "import json, sys; s = json.load(open(sys.argv[1])); t = {k: v.get('seconds') for k, v in s['stages'].items()}; print('seconds per stage:', t, 'total:', round(sum(x or 0 for x in t.values()), 1))" "$OUT/summary-job.json" ;;
  esac
done
