"""No device-to-host read in a training step that neither logs, evaluates nor saves (issue 30).

A read (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`, ...) makes the host wait until the
device has finished everything queued, so it cannot queue the next step while this one runs. Every
read in a step's window is counted (tests/reads.py): 8 steps logged every 4, no eval and no checkpoint
before the end, so steps 1-3 and 5-7 must read nothing; steps 4 and 8 read the loss (the counter
works). The same on two processes: tests/distributed/test_step_reads_distributed.py.
"""
import pytest

from conftest import tiny_overrides
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe
from reads import ReadCounter, engine_reads

QUIET = (1, 2, 3, 5, 6, 7)
PATHS = {
    "plain": [],
    "accumulation": ["train.batch_size=4", "train.grad_accum=2"],
    "class-weights": ["train.class_weights=[1.0, 3.0]", "train.batch_size=4", "train.grad_accum=2"],
    "fp16": ["train.precision=fp16"],
    "bf16": ["train.precision=bf16"],
}


def counted_run(*args) -> dict:
    counter = ReadCounter()
    with counter.installed():
        finetune(load_recipe(None, [*args, "train.max_steps=8", "train.log_every=4", "train.eval_every=0",
                                    "checkpoint.keep=0"]))
    return counter.reads


@pytest.mark.parametrize("path", PATHS)
def test_a_quiet_step_reads_nothing_back(tiny_bert, tiny_data, tmp_path, path):
    reads = counted_run(*tiny_overrides(tiny_bert, tiny_data, tmp_path / "run"), *PATHS[path])
    assert engine_reads(reads, QUIET) == {}
    assert engine_reads(reads, [4]) and engine_reads(reads, [8])  # the logged steps read the loss back
