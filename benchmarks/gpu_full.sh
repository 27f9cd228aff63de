#!/usr/bin/env bash
# Issue 24's one run on a lent GPU (one H200, under 9 minutes): real weights and real reviews at full
# size, the Trainer beside the engine, and the engine near the hardware's limit. Needs the material
# (python benchmarks/gpu_material.py writes gpu_material/; the run carries it) and an engine that reads
# its pre-tokenized splits.
#   (a) analysis1: gpu_analysis1.yaml, the seed's Analysis 1 at full size (MiniLM, 24,000 train / 1,000
#       dev / 25,000 test, 256 head_tail, precision auto, 1 epoch): the engine, the Trainer with the
#       same levers, the Trainer's blog recipe;
#   (b) epochs + epoch-curve: gpu_epochs.yaml, 10 epochs with dev every epoch and keep_best, test at the
#       end; benchmarks/epoch_curve.py writes the per-epoch table and PNG (epochs/epochs.md, .png);
#   (c, d) limits + recompiles: gpu_limits.yaml, BERT-base at 512 tokens with each lever its own row
#       (torch.compile, batch 128, both, activation checkpointing), then the Llama-3.2-1B shape (LoRA,
#       the Trainer with peft, full FSDP2 with activation checkpointing, QLoRA); `recompiles` counts
#       the recompilations each compiled run logged (TORCH_LOGS=recompiles).
#   (e) levers + levers-sync (issue 30): gpu_levers.yaml, each lever its own row on reviews of many
#       lengths (BERT-base shape, bf16): plain, torch.compile, compile + data.pad_buckets, and the same with
#       compile_mode reduce-overhead; levers-sync runs the plain row again with the per-step read of the
#       engine before issue 30 put back (benchmarks/levers/), so the two give the sync-free step's share.
#       No material needed, ~7 minutes: not part of the default run (which they would push past the device
#       tool's 10 minutes a command), but a call of their own: --steps prepare,levers,levers-sync,recompiles.
# Steps run in that order, each under its own limit; the last matrix gets what the budget leaves, and
# the harness writes the rows that finished when its time runs out.
#
#   benchmarks/gpu_full.sh --commit SHA [--dry-run] [--out DIR] [--overwrite] [--steps a,b,...]
#
# --commit SHA (or GPU_COMMIT=SHA): the commit the files came from, recorded in summary.md; the GPU
# machine's copy of .git can be older than its files (benchmarks/results/gpu/trainer_levers/PROVENANCE.md).
# --steps: only these steps (names as listed by --dry-run), e.g. to run the rest in a second loan.
# --dry-run (any machine, seconds): lists each step and its command, checks that every matrix loads and
# every command's recipe overrides and trainer_args are valid, and that the material (if written) fits
# the device tool's 64 MiB with the checkout; writes nothing.
# Results go to DIR (default benchmarks/results/gpu_full): summary.md, logs/<step>.log, and per matrix
# results.json / results.md / plots under analysis1/, epochs/, limits/, levers/, levers-sync/.
# Exit code: 0 when every step that ran passed, 1 when one failed, 2 for bad arguments.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
DRY=0
OVERWRITE=0
DEST=benchmarks/results/gpu_full
COMMIT=${GPU_COMMIT:-}
ONLY=""
BUDGET_S=540  # 9 minutes in all
while (( $# )); do
  case $1 in
    --dry-run) DRY=1 ;;
    --overwrite) OVERWRITE=1 ;;
    --out) DEST=${2:?--out needs a folder}; shift ;;
    --commit) COMMIT=${2:?--commit needs a commit}; shift ;;
    --steps) ONLY=${2:?--steps needs a comma-separated list}; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
ALL_STEPS=(prepare analysis1 epochs epoch-curve limits levers levers-sync recompiles)
for s in ${ONLY//,/ }; do
  [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "error: --steps: unknown step '$s' (${ALL_STEPS[*]})" >&2; exit 2; }
done
if (( ! DRY )) && [[ -z $COMMIT ]]; then
  echo "error: pass --commit SHA (or GPU_COMMIT): the commit these files came from, as the sending checkout" \
       "says (git rev-parse HEAD there); this machine's .git may be stale" >&2
  exit 2
fi

WORK=${GPU_FULL_WORK:-$ROOT/benchmarks/.work/gpu_full}
MATERIAL=${GPU_MATERIAL:-$ROOT/gpu_material}
LOGS=$DEST/logs
SUMMARY=$DEST/summary.md
FAILED=0
START=$SECONDS
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
(( DRY )) || export XDG_CACHE_HOME=$WORK/cache  # token, probe and base-score caches of this run only
source benchmarks/gpu_steps.sh  # step, skip, summary_header

OWN_CALL=(levers levers-sync)  # steps run only when --steps names them (a dry run lists them all)
wanted() {
  if [[ -n $ONLY ]]; then [[ ",$ONLY," == *",$1,"* ]]; return; fi
  (( DRY )) || [[ " ${OWN_CALL[*]} " != *" $1 "* ]]
}
left() {  # seconds the budget leaves, less a margin for the step after (recompiles), at least $1
  local l=$((BUDGET_S - (SECONDS - START) - 40))
  (( l < $1 )) && l=$1
  echo "$l"
}
MATRICES=${GPU_MATRICES:-benchmarks/matrices}
matrix() {  # NAME LIMIT [MATRIX [ONLY [VAR=VALUE...]]]: benchmarks/run.py on MATRICES/gpu_MATRIX.yaml
  # (default: gpu_NAME.yaml), only the scenarios matching ONLY, with VAR=VALUE in its environment, into DEST/NAME
  local name=$1 limit=$2 file=$MATRICES/gpu_${3:-$1}.yaml only=() vars=("${@:5}")
  [[ -n ${4:-} ]] && only=(--only "$4")
  if (( DRY )); then
    echo "$name (at most ${limit}s): ${vars[*]:+${vars[*]} }$PY benchmarks/run.py --matrix $file ${only[*]:+${only[*]} }--out $DEST/$name; its scenarios:"
    PYTHONPATH=$ROOT "$PY" benchmarks/run.py --matrix "$file" "${only[@]}" --out "$DEST/$name" --dry-run | sed 's/^/  /'
    (( PIPESTATUS[0] == 0 )) || { echo "error: $file: a scenario would be refused (above)" >&2; exit 1; }
    return 0
  fi
  step "$name" "$limit" env "${vars[@]}" "$PY" benchmarks/run.py --matrix "$file" "${only[@]}" --out "$DEST/$name" \
    --work "$WORK/$name" --overwrite
}

if (( DRY )); then
  echo "gpu_full --dry-run: commit ${COMMIT:-<none given: a real run needs --commit>}; material $MATERIAL"
  if [[ -e $MATERIAL/material.json ]]; then
    "$PY" benchmarks/gpu_material.py --out "$MATERIAL" --check || exit 1
  else
    echo "no material at $MATERIAL yet: python benchmarks/gpu_material.py writes it (its size is checked then)"
  fi
else
  if [[ -e $SUMMARY && $OVERWRITE == 0 ]]; then
    echo "error: $DEST holds a finished run (summary.md); pass --overwrite or another --out" >&2
    exit 2
  fi
  rm -rf "$DEST" "$WORK"
  mkdir -p "$LOGS" "$WORK"
  summary_header "GPU full run, $(date -u +%Y-%m-%dT%H:%MZ), commit $COMMIT (given; this copy's .git says $(git rev-parse --short HEAD 2>/dev/null || echo nothing))"
fi

have_material=1
[[ -e $MATERIAL/material.json ]] || have_material=0

need_material=0  # the levers' call (synthetic data) needs neither the material nor datasets
for s in analysis1 epochs epoch-curve; do wanted $s && need_material=1; done
wanted prepare && step prepare 45 env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" MATERIAL="$MATERIAL" \
  NEED_MATERIAL=$need_material "$PY" -c "
import importlib.util, json, os, torch
assert torch.cuda.is_available(), 'no CUDA device'
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
for name in ('datasets', 'peft', 'bitsandbytes', 'matplotlib'):
    print(name, 'importable' if importlib.util.find_spec(name) else 'MISSING')
if os.environ['NEED_MATERIAL'] == '1':
    assert importlib.util.find_spec('datasets'), 'datasets is missing: carry its wheels (docs: gpuprep)'
    info = json.load(open(os.path.join(os.environ['MATERIAL'], 'material.json')))
    print('material:', info['model']['source'], info['model']['dtype'],
          {k: v['rows'] for k, v in info['data'].items() if isinstance(v, dict)}, info['cut'])
"

if (( have_material )) || (( DRY )); then
  wanted analysis1 && matrix analysis1 190
  wanted epochs && matrix epochs 180
  RUN10=$WORK/epochs/runs/engine-10-epochs/r1  # its log and metrics are kept beside the curve
  wanted epoch-curve && step epoch-curve 30 bash -c "'$PY' benchmarks/epoch_curve.py '$RUN10' --out '$DEST/epochs' &&
    cp '$RUN10/log.jsonl' '$RUN10/metrics.json' '$DEST/epochs/'"
else
  for s in analysis1 epochs epoch-curve; do wanted $s && skip $s "no material at $MATERIAL"; done
fi

export TORCH_LOGS=recompiles  # each compiled run's stderr names every recompilation and its reason
wanted limits && matrix limits "$(left 60)"
# issue 30's levers (no material): each its own row; then the plain row with the old per-step read put back
if wanted levers; then matrix levers 400
elif [[ -z $ONLY ]]; then skip levers "a call of its own: --steps prepare,levers,levers-sync,recompiles"; fi
if wanted levers-sync; then matrix levers-sync 90 levers '^levers-plain$' BENCH_SYNC_EACH_STEP=1 \
  PYTHONPATH="$ROOT/benchmarks/levers${PYTHONPATH:+:$PYTHONPATH}"
elif [[ -z $ONLY ]]; then skip levers-sync "a call of its own: --steps prepare,levers,levers-sync,recompiles"; fi
wanted recompiles && step recompiles 30 "$PY" -c "
import pathlib
rows = ['| run | recompilations logged (TORCH_LOGS=recompiles) |', '|---|---|']
for err in sorted(p for m in ('limits', 'levers') for p in pathlib.Path('$WORK', m, 'runs').glob('*compile*/r*/stderr.txt')):
    n = sum('Recompiling function' in line for line in err.read_text(errors='replace').splitlines())
    rows.append(f'| {err.parent.parent.name} | {n} |')
pathlib.Path('$DEST/limits').mkdir(parents=True, exist_ok=True)
pathlib.Path('$DEST/limits/recompiles.md').write_text('\\n'.join(rows) + '\\n')
print('\\n'.join(rows))
"

(( DRY )) && exit 0
echo >>"$SUMMARY"
echo "whole run: $((SECONDS - START)) s; logs in $LOGS" >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
