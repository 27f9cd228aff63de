#!/usr/bin/env bash
# One check for a lent CUDA machine (one GPU, at most 8 minutes): no network there and at most
# 64 MiB of files with the checkout, so every model is built from its config (random weights,
# benchmarks/build.py) and every data set is synthetic.
#   (a) every CUDA path of the engine once, at small size (a tiny BERT, 48 steps): bf16 autocast
#       (precision auto must pick bf16 there), fused AdamW, activation checkpointing, save and
#       reload of tuned/, DDP and FSDP2 at world size 1 over nccl, LoRA, and QLoRA when
#       bitsandbytes imports (else a line saying it was skipped); then `learned`: each of those
#       runs scored at least 0.75 after training (the untrained model scores 0.5);
#   (b) benchmarks/matrices/gpu.yaml: DistilBERT- and BERT-base shapes, seq 512, bf16, the engine
#       against the Trainer with the same levers, MFU against the datasheet peak.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--overwrite]
#
# --dry-run (any machine, seconds): lists each step and its command, checks that every engine
# command's overrides are valid recipe keys and that gpu.yaml loads, and writes nothing.
# Results go to DIR (default benchmarks/results/gpu): summary.md (one line per step: ok / failed /
# skipped, seconds), logs/<step>.log, and the matrix's results.json / results.md under matrix/.
# Exit code: 0 when every step that ran passed, 1 when one failed, 2 for bad arguments.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
# the project's .venv where scripts/setup.sh made one, else python3 (a GPU machine's own torch)
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
DRY=0
OVERWRITE=0
DEST=benchmarks/results/gpu
BUDGET_S=480  # 8 minutes in all; the matrix gets what the paths leave, less a margin
while (( $# )); do
  case $1 in
    --dry-run) DRY=1 ;;
    --overwrite) OVERWRITE=1 ;;
    --out) DEST=${2:?--out needs a folder}; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

WORK=${GPU_CHECK_WORK:-$ROOT/benchmarks/.work/gpu_check}
LOGS=$DEST/logs
SUMMARY=$DEST/summary.md
FAILED=0
START=$SECONDS
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export XDG_CACHE_HOME=$WORK/cache  # token, probe and base-score caches of this check only
source benchmarks/gpu_steps.sh  # step, skip, summary_header

if (( ! DRY )); then
  if [[ -e $SUMMARY && $OVERWRITE == 0 ]]; then
    echo "error: $DEST holds a finished check (summary.md); pass --overwrite or another --out" >&2
    exit 2
  fi
  rm -rf "$DEST" "$WORK"
  mkdir -p "$LOGS" "$WORK"
  # GPU_COMMIT: the commit the files came from, given by whoever sent them (the machine's .git can be stale)
  commit=${GPU_COMMIT:-}
  [[ -n $commit ]] || commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown) (from the .git here)"
  summary_header "GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $commit"
fi

MODEL=$WORK/models/tiny-bert
DATA=$WORK/data/synthetic
# a small run: a tiny BERT built from its config, 256 synthetic reviews, 48 steps (3 epochs): enough
# for it to learn them (on CPU: 0.50 -> 1.00; the `learned` step asserts it), so a path that runs but
# trains nothing fails. Adapters on a random body learn only on every linear layer, at a higher lr
common=(--recipe "$WORK/empty.yaml" --overwrite "model.name_or_path=$MODEL" "data.source=$DATA"
        data.max_length=128 train.batch_size=16 train.max_steps=48 train.lr=3e-3 train.log_every=12
        train.precision=auto checkpoint.every=24)
adapters=(train.lr=1e-2 "peft.target_modules=[all-linear]")  # no spaces inside: the dry run splits on them
train() {  # NAME LAUNCHER... -- OVERRIDES...: launch/train.py into $WORK/runs/NAME
  local name=$1; shift
  local launcher=()
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done
  shift
  step "$name" 120 "${launcher[@]}" launch/train.py "${common[@]}" "output_dir=$WORK/runs/$name" "$@"
}
torchrun1=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)

if (( DRY )); then
  # what the listed commands need: valid recipe keys, and a matrix that loads
  PYTHONPATH=$ROOT ADAPTERS="${adapters[*]}" "$PY" - "${common[@]:3}" <<'EOF' || exit 1
import os
import sys
from engine.recipe_yaml import load_recipe
adapters = os.environ["ADAPTERS"].split()
for extra in ([], ["train.activation_checkpointing=true"], ["distributed.strategy=ddp"],
              ["distributed.strategy=fsdp"], ["peft.method=lora", *adapters], ["peft.method=qlora", *adapters]):
    load_recipe(None, sys.argv[1:] + ["output_dir=x"] + extra)
EOF
  echo "gpu_check --dry-run: would build a tiny BERT and synthetic data in $WORK, then run:"
fi

step prepare 120 env PYTHONPATH="$ROOT" "$PY" -c "
import json, os, shutil, torch
from benchmarks.build import build_data, build_model
assert torch.cuda.is_available(), 'no CUDA device'
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
model = build_model({'build': 'tiny-bert', 'tokenizer': 'wordpiece'}, '$WORK/models')
data = build_data({'train': 256, 'test': 64, 'words': [20, 120]}, '$WORK/data')
os.symlink(model, '$MODEL'); os.symlink(data, '$DATA')
open('$WORK/empty.yaml', 'w').write('# benchmarks/gpu_check.sh: every setting is an override\n')
"

step fused-adamw-bf16 60 env PYTHONPATH="$ROOT" "$PY" -c "
import torch
from engine.config import TrainConfig
from engine.optim import build_optimizer
from engine.precision import Precision, choose
dev = torch.device('cuda', 0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256)).to(dev)
opt = build_optimizer(model, TrainConfig())
assert opt.defaults.get('fused'), f'AdamW is not fused on CUDA: {opt.defaults}'
chosen = choose('auto', dev)
assert chosen.name == 'bf16', f'precision auto chose {chosen.name} on {torch.cuda.get_device_name(0)}'
with Precision(chosen.name, dev).autocast():
    y = model[0](torch.randn(8, 256, device=dev))
assert y.dtype == torch.bfloat16, y.dtype
model[0](torch.randn(8, 256, device=dev)).float().sum().backward()
opt.step()
print('fused AdamW step ok; autocast matmul dtype', y.dtype, '|', chosen.describe())
"

# bf16 autocast end to end (auto must resolve to bf16), activation checkpointing, checkpoint saves
train bf16-actckpt "$PY" -- train.activation_checkpointing=true
step save-reload 90 env PYTHONPATH="$ROOT" "$PY" -c "
import json, subprocess, sys
run = '$WORK/runs/bf16-actckpt'
m = json.load(open(run + '/metrics.json'))
assert m['train']['precision'] == 'bf16', m['train']
p = subprocess.run([sys.executable, 'launch/evaluate.py', '--model', run + '/tuned', '--data', '$DATA',
                    '--max-length', '128', '--precision', 'bf16', '--output', run + '/reload.json'],
                   capture_output=True, text=True)
assert p.returncode == 0, p.stderr[-2000:]
again = json.load(open(run + '/reload.json'))
for key, within in (('accuracy', 0.02), ('loss', 0.02)):  # the loss too: a random model also scores 0.5
    assert abs(again[key] - m['tuned'][key]) < within, (key, again[key], m['tuned'][key])
print('tuned/ reloaded: accuracy', again['accuracy'], 'loss', round(again['loss'], 4),
      '| as trained', m['tuned']['accuracy'], round(m['tuned']['loss'], 4))
"
train ddp-nccl "${torchrun1[@]}" -- distributed.strategy=ddp
train fsdp2-nccl "${torchrun1[@]}" -- distributed.strategy=fsdp
train lora "$PY" -- peft.method=lora "${adapters[@]}"
if "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
  train qlora "$PY" -- peft.method=qlora "${adapters[@]}"
else
  skip qlora "bitsandbytes is not importable here"
fi
# every run above that finished learned the reviews (tuned accuracy; the base scores 0.5)
step learned 30 env PYTHONPATH="$ROOT" "$PY" -c "
import json, pathlib
runs = sorted(pathlib.Path('$WORK/runs').glob('*/metrics.json'))
assert runs, 'no run finished'
low = {}
for f in runs:
    m = json.loads(f.read_text())
    print(f.parent.name, 'base', m['base']['accuracy'], '-> tuned', m['tuned']['accuracy'])
    if m['tuned']['accuracy'] < 0.75:  # 64 reviews: chance (0.5) is 4 standard errors below
        low[f.parent.name] = m['tuned']['accuracy']
assert not low, f'tuned accuracy under 0.75: {low}'
"

# (b) the matrix, in what the 8 minutes leave (the harness keeps what finished if time runs out)
left=$((BUDGET_S - (SECONDS - START) - 20))
(( left < 60 )) && left=60
if (( DRY )); then
  echo "matrix (${BUDGET_S}s less the steps above): $PY benchmarks/run.py --matrix benchmarks/matrices/gpu.yaml" \
       "--out $DEST/matrix; its scenarios:"
  PYTHONPATH=$ROOT "$PY" benchmarks/run.py --matrix benchmarks/matrices/gpu.yaml --out "$DEST/matrix" --dry-run \
    | sed 's/^/  /' || exit 1
  exit 0
fi
step matrix "$left" "$PY" benchmarks/run.py --matrix benchmarks/matrices/gpu.yaml --out "$DEST/matrix" \
  --work "$WORK/matrix" --overwrite
echo >>"$SUMMARY"
echo "whole check: $((SECONDS - START)) s; logs in $LOGS" >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
