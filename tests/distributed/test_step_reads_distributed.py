"""No device-to-host read in a quiet training step under DDP and FSDP2 on 2 processes (gloo), with
gradient accumulation and class weights (whose denominator is summed over the ranks): see
tests/test_step_reads.py for what is counted and why."""
import json

import pytest

from conftest import run_cli, tiny_overrides
from reads import engine_reads

QUIET = (1, 2, 3, 5, 6, 7)


@pytest.mark.parametrize("strategy, extra", [("ddp", []), ("fsdp", ["train.precision=bf16"])])
def test_a_quiet_step_reads_nothing_back_on_two_processes(tiny_bert, tiny_data, tmp_path, strategy, extra):
    out = tmp_path / "reads"
    out.mkdir()
    p = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/distributed/count_reads.py",
                *tiny_overrides(tiny_bert, tiny_data, tmp_path / "run"), f"distributed.strategy={strategy}",
                "train.batch_size=4", "train.grad_accum=2", "train.class_weights=[1.0, 3.0]", "train.max_steps=8",
                "train.log_every=4", "train.eval_every=0", "checkpoint.keep=0", *extra, env={"READS_OUT": str(out)})
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        reads = json.loads((out / f"rank-{rank}.json").read_text())
        assert engine_reads(reads, QUIET) == {}, rank
        assert engine_reads(reads, [4]) and engine_reads(reads, [8]), rank  # the logged steps read the loss
