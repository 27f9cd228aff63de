"""train.compile=true: what is saved is the model that trained, under its own names.

torch.compile wraps the model in an OptimizedModule whose state_dict keys start with `_orig_mod.`;
a tuned/ saved under those names reloads as random weights (transformers initialises every weight
it misses). The runs here compile with the eager backend (tests/faults FAULT_COMPILE_BACKEND): the
wrapper, which is what the engine must see through, is the same whatever the backend, and inductor
would add ~40 s of kernel builds per process on CPU without changing a saved key.
"""
import json

import pytest
from safetensors.torch import load_file

from conftest import faults, run_cli, tiny_overrides
from engine.config import DataConfig
from engine.evaluation import evaluate_pretrained

EAGER = faults(compile_backend="eager")


def compiled_args(model, data, out, *extra):
    return ["launch/train.py", "--recipe", "/dev/null", *tiny_overrides(model, data, out), "train.compile=true",
            "checkpoint.keep=0", *extra]


def reloads_as_reported(out, data, learned=True):
    """tuned/ has plain names, and reloaded alone scores what metrics.json reported."""
    keys = load_file(out / "tuned" / "model.safetensors").keys()
    assert not [k for k in keys if "_orig_mod" in k]
    m = json.loads((out / "metrics.json").read_text())
    alone = evaluate_pretrained(str(out / "tuned"), DataConfig(source=data, max_length=32), "test")
    assert m["tuned"]["accuracy"] == alone["accuracy"] and m["tuned"]["confusion"] == alone["confusion"]
    assert m["tuned"]["loss"] == pytest.approx(alone["loss"], abs=1e-5)
    if learned:  # a reload of random weights could not score this
        assert m["tuned"]["accuracy"] > 0.9
    return m


@pytest.mark.parametrize("keep_best", [False, True])
def test_compiled_run_saves_what_it_scored(tiny_bert, tiny_data, tmp_path, keep_best):
    out = tmp_path / "run"
    extra = ["train.keep_best=true", "train.eval_every=6"] if keep_best else []
    p = run_cli(*compiled_args(tiny_bert, tiny_data, out, *extra, "checkpoint.keep=1"), env=EAGER)
    assert p.returncode == 0, p.stderr[-3000:]
    reloads_as_reported(out, tiny_data)
    # the other weights a run keeps: its checkpoint and, with keep_best, the best so far
    kept = [*(out / "checkpoints").glob("step-*/*.safetensors"), *(out / "checkpoints").glob("best.safetensors")]
    assert len(kept) == (3 if keep_best else 1)
    for f in kept:
        assert not [k for k in load_file(f) if "_orig_mod" in k], f


def test_compiled_lora_run_saves_what_it_scored(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run_cli(*compiled_args(tiny_bert, tiny_data, out, "peft.method=lora"), env=EAGER)
    assert p.returncode == 0, p.stderr[-3000:]
    # adapters on a tiny random body learn little; the trained head alone must survive the reload
    m = reloads_as_reported(out, tiny_data, learned=False)
    assert m["tuned"]["loss"] != m["base"]["loss"]
    assert not [k for k in load_file(out / "adapter" / "adapter_model.safetensors") if "_orig_mod" in k]
