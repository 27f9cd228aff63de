"""On 2 processes: a compiled run saves what it scored, dropout differs across ranks, and a rank that
does not share rank 0's output_dir stops the run at start."""
import socket

import pytest

from conftest import faults, run_torchrun, tiny_overrides
from test_compile import EAGER, reloads_as_reported


def _args(model, data, out, strategy, *extra):
    return ["--recipe", "/dev/null", *tiny_overrides(model, data, out), "train.batch_size=4",
            f"distributed.strategy={strategy}", "checkpoint.keep=0", *extra]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_run_saves_what_it_scored(tiny_bert, tiny_data, tmp_path, strategy):
    # compiled with the eager backend: see tests/test_compile.py
    out = tmp_path / "run"
    p = run_torchrun(2, *_args(tiny_bert, tiny_data, out, strategy, "train.compile=true"), env=EAGER)
    assert p.returncode == 0, p.stderr[-3000:]
    reloads_as_reported(out, tiny_data)


def test_ranks_draw_their_own_dropout_masks(tiny_bert_dropout, tiny_data, tmp_path):
    log = tmp_path / "masks"
    p = run_torchrun(2, *_args(tiny_bert_dropout, tiny_data, tmp_path / "run", "ddp", "train.max_steps=2"),
                     env=faults(log_dropout=log))
    assert p.returncode == 0, p.stderr[-3000:]
    masks = dict(line.split() for line in log.read_text().splitlines())
    assert sorted(masks) == ["0", "1"] and "0" in masks["0"]  # each rank's first mask, with dropped units
    assert masks["0"] != masks["1"]


def test_a_rank_that_does_not_see_output_dir_stops_the_run_at_start(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    # rank 1's output_dir names another folder, as a node whose path is on a disk of its own
    p = run_torchrun(2, *_args(tiny_bert, tiny_data, out, "ddp"), env=faults(own_disk=1, rank=1), timeout=120)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert f"rank 1 on node {socket.gethostname()} does not see the files rank 0 writes" in errors[0]
    assert "shared filesystem" in errors[0]
    assert not (out / "log.jsonl").exists() and not (out / "base").exists()
    assert not any(p.name.startswith(".shared-check") for p in out.iterdir())
