#!/usr/bin/env bash
# Prove the GPU path (issue 8 §4): everything that must hold on a CUDA machine, in under 10 minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh [--cpu] [--out FILE]
#
# Steps: model (convert/cache SmolLM2, or build a tiny model), tests (pytest -m gpu), bench_train (d_in 2048 x 32,
# bf16 autocast, against the bf16 matmul ceiling; AuxK's share of TopK's step), bench_syncs (host syncs per step of
# every variant under CUDA's sync debug mode, against tests/test_syncs.py's budget), bench_memory (the allocator's
# peak of every variant, initial fit included, fp32 and bf16, against the memory plan at d_in 2048 x 65,536, batch
# 4096), bench_harvest (model in bf16, the harvester's own batch size), cache (a bf16 harvest for the DDP step),
# on_the_fly (`sae train ... train.source=model`, a few million tokens), ddp (torchrun over every GPU torch sees,
# i.e. those CUDA_VISIBLE_DEVICES leaves; with fewer than 2 it is reported "not exercised": torchrun with one process
# creates no process group, so its run would prove nothing about DDP).
# Each step runs under its own time limit (LIMIT below; the limits add up to the whole run's deadline, so a step that
# hangs costs only its own share) and a failing step does not stop the rest; a step that ends early leaves its time
# to the next one. One JSON line per step and a
# summary line go to stdout and to --out FILE, else $OUT/gpu_check.json, else runs/gpu_check/gpu_check.json; every
# step's output is kept next to it in <summary>_logs/. Exit status 0 when every step run passed, else 1.
#
# --cpu: the same steps at tiny sizes on the CPU (a tiny 16-layer Llama, so the demo config's hooks exist, run in fp32;
# torchrun with 2 gloo processes), a smoke test that keeps this script from rotting (tests/test_gpu_check.py).
# Use the Python of the environment to check (PYTHON=..., default `python`); this checkout's `sae` is imported.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

MODE=gpu
OUTFILE=
while (($#)); do
  case $1 in
    --cpu) MODE=cpu ;;
    --out) OUTFILE=${2:?--out needs a file name}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUMMARY=${OUTFILE:-${OUT:+$OUT/gpu_check.json}}
SUMMARY=$(realpath -m "${SUMMARY:-$ROOT/runs/gpu_check/gpu_check.json}")
LOGS=${SUMMARY%.json}_logs
cd "$ROOT"
mkdir -p "$(dirname "$SUMMARY")"
rm -rf "$LOGS" && mkdir -p "$LOGS"
: >"$SUMMARY"
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# _run NAME LIMIT STDOUT [judge options] -- COMMAND...: run COMMAND with stderr to the step's log and stdout to
# STDOUT, under its LIMIT plus the time the steps before it left unused, then append the judge's JSON line to the summary.
_run() {
  local name=$1 limit=$2 stdout=$3 rc=0 t0 judge=()
  shift 3
  while [[ $1 != -- ]]; do judge+=("$1"); shift; done
  shift
  END=$((END + limit)) # this step may use its own share and whatever the steps before it left
  limit=$((END - SECONDS))
  : >"$LOGS/$name.log" && : >"$stdout"
  t0=$(date +%s.%N)
  if ((limit < 5)); then
    rc=124 # the steps before it overran into its share (their kill grace): reported as timed out, not run
  else
    timeout --kill-after=15 "$limit" "$@" >>"$stdout" 2>>"$LOGS/$name.log" || rc=$?
  fi
  "$PY" scripts/gpu_check_step.py step "$name" --mode "$MODE" --rc "$rc" --started "$t0" --limit "$limit" \
    --log "$LOGS/$name.log" "${judge[@]}" | tee -a "$SUMMARY" || true
}
run_step() { _run "$1" "$2" "$LOGS/$1.log" "${@:3}"; }                         # all output to the log
run_bench() { _run "$1" "$2" "$LOGS/$1.json" --stdout "$LOGS/$1.json" "${@:3}"; } # stdout is one JSON document

DEMO=(--config configs/demo.yaml)
# Each step's share of the run, in seconds, in the order the steps run. On the GPU they add up to 580 s, which leaves
# room in one 10-minute device call; on the CPU the tiny run takes about a minute and the limits are guards only.
declare -A LIMIT=([model]=60 [tests]=90 [bench_train]=70 [bench_syncs]=40 [bench_memory]=90 [bench_harvest]=60
  [cache]=40 [on_the_fly]=70 [ddp]=60)
END=0 # where the current step's share ends, in seconds since the start
if [[ $MODE == gpu ]]; then
  DEV=cuda
  NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  MODEL=smollm2
  MODEL_ARGS=() # the demo config's model: SmolLM2-135M, layer 15
  HARVEST_BATCH=() # the harvester's own choice on CUDA: 16,384 tokens per forward (sae.data.harvest.batch_size)
  MODEL_DTYPE=bfloat16
  run_step model "${LIMIT[model]}" -- "$PY" -c 'from sae.data.model import resolve_spec; print(resolve_spec("smollm2"))'
  BENCH_TRAIN=(--device cuda --autocast --d-in 2048 --expansion 32 --batch 4096 --warmup 3 --rounds 20 --no-rss)
  SAE_SHAPE=(--d-in 2048 --d-sae 65536 --batch 4096)
  BENCH_SYNCS=(--device cuda "${SAE_SHAPE[@]}")
  BENCH_MEMORY=(--device cuda "${SAE_SHAPE[@]}")
  BENCH_HARVEST=(--device cuda --tokens 131072)
  CACHE_TOKENS=1000000
  OTF_TOKENS=4000000
  DDP_DEVICE=auto # each rank picks its own GPU
else
  DEV=cpu
  NPROC=2
  MODEL=$WORK/tiny
  MODEL_ARGS=("harvest.model=$MODEL")
  HARVEST_BATCH=(harvest.batch_size=16)
  MODEL_DTYPE=float32 # bf16 matmuls on a CPU without bf16 units run ~10x slower than fp32
  run_step model "${LIMIT[model]}" -- "$PY" -m sae.tiny "$MODEL" --layers 16
  BENCH_TRAIN=(--device cpu --autocast --d-in 64 --expansion 4 --batch 256 --warmup 1 --rounds 2 --no-rss --no-saelens)
  SAE_SHAPE=(--d-in 64 --d-sae 1024 --batch 256)
  BENCH_SYNCS=(--device cpu "${SAE_SHAPE[@]}")
  BENCH_MEMORY=(--device cpu "${SAE_SHAPE[@]}" --steps 2 --sample-rows 4096)
  BENCH_HARVEST=(--device cpu --tokens 1024 --repeats 1 --hooks blocks.15.hook_resid_post)
  CACHE_TOKENS=4096
  OTF_TOKENS=4096
  DDP_DEVICE=cpu
fi
HARVEST_ARGS=("${MODEL_ARGS[@]}" "${HARVEST_BATCH[@]}" "harvest.device=$DEV" "harvest.model_dtype=$MODEL_DTYPE")

run_step tests "${LIMIT[tests]}" --path "$LOGS/tests.xml" -- \
  "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$LOGS/tests.xml"
run_bench bench_train "${LIMIT[bench_train]}" -- "$PY" scripts/bench_train.py "${BENCH_TRAIN[@]}"
run_bench bench_syncs "${LIMIT[bench_syncs]}" -- "$PY" scripts/bench_syncs.py "${BENCH_SYNCS[@]}"
run_bench bench_memory "${LIMIT[bench_memory]}" -- "$PY" scripts/bench_memory.py "${BENCH_MEMORY[@]}"
run_bench bench_harvest "${LIMIT[bench_harvest]}" -- "$PY" scripts/bench_harvest.py --model "$MODEL" --model-dtype "$MODEL_DTYPE" "${BENCH_HARVEST[@]}"
run_step cache "${LIMIT[cache]}" --path "$WORK/cache" -- "$PY" -m sae harvest "${DEMO[@]}" "${HARVEST_ARGS[@]}" \
  "harvest.out=$WORK/cache" "harvest.max_tokens=$CACHE_TOKENS"
run_step on_the_fly "${LIMIT[on_the_fly]}" --path "$WORK/otf" -- "$PY" -m sae train "${DEMO[@]}" "${HARVEST_ARGS[@]}" \
  train.source=model "train.total_tokens=$OTF_TOKENS" "train.out=$WORK/otf" "train.device=$DEV"
if ((NPROC >= 2)); then
  run_step ddp "${LIMIT[ddp]}" --path "$WORK/ddp" --world "$NPROC" -- \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m sae train "${DEMO[@]}" \
    "train.cache=$WORK/cache" "train.out=$WORK/ddp" "train.device=$DDP_DEVICE"
else # the judge reports it not exercised
  "$PY" scripts/gpu_check_step.py step ddp --mode "$MODE" --rc 0 --started "$(date +%s.%N)" --world "$NPROC" |
    tee -a "$SUMMARY" || true
fi

"$PY" scripts/gpu_check_step.py summary "$SUMMARY" --mode "$MODE" --seconds "$SECONDS" | tee -a "$SUMMARY"
echo "gpu_check: summary in $SUMMARY, logs in $LOGS" >&2
tail -n 1 "$SUMMARY" | grep -q '"ok": true'
