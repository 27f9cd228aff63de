"""DDP and FSDP2 on 2 CPU processes (gloo) against a one-process reference, as users launch them."""
import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, faults, run_cli, run_torchrun, tiny_overrides
from engine.batching import eval_batches
from engine.config import DataConfig
from engine.evaluation import evaluate_pretrained

EVAL_BATCH = 5  # 33 eval examples -> 7 batches: rank 0 scores 4, rank 1 scores 3


def _args(model, data, out, *extra):
    return ["--recipe", "/dev/null", *tiny_overrides(model, data, out), "train.log_every=1",
            "train.max_steps=8", "train.eval_every=0", f"train.eval_batch_size={EVAL_BATCH}", *extra]


def _losses(out):
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_data, tmp_path_factory):
    """One process x batch 8 and 2 ranks x batch 4 (DDP, FSDP), with and without accumulation."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for accum in (1, 2):
        single = root / f"single-{accum}"
        p = run_cli("launch/train.py", *_args(tiny_bert, tiny_data, single, "train.batch_size=8",
                                              f"train.grad_accum={accum}"))
        assert p.returncode == 0, p.stderr[-3000:]
        out[("none", accum)] = single
        for strategy in ("ddp", "fsdp"):
            d = root / f"{strategy}-{accum}"
            p = run_torchrun(2, *_args(tiny_bert, tiny_data, d, "train.batch_size=4",
                                       f"train.grad_accum={accum}", f"distributed.strategy={strategy}"))
            assert p.returncode == 0, p.stderr[-3000:]
            out[(strategy, accum)] = d
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("accum", [1, 2])
def test_same_loss_curve_and_weights_as_one_process(runs, strategy, accum):
    ref, dist = runs[("none", accum)], runs[(strategy, accum)]
    assert len(_losses(ref)) == 8
    assert _losses(dist) == pytest.approx(_losses(ref), abs=1e-5)
    a = load_file(ref / "tuned" / "model.safetensors")
    b = load_file(dist / "tuned" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_tuned_snapshot_has_the_single_process_format(runs, strategy):
    from transformers import AutoModelForSequenceClassification
    ref, dist = runs[("none", 1)], runs[(strategy, 1)]
    assert sorted(p.name for p in (dist / "tuned").iterdir()) == sorted(p.name for p in (ref / "tuned").iterdir())
    model = AutoModelForSequenceClassification.from_pretrained(dist / "tuned")
    saved = load_file(dist / "tuned" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name  # loads into a plain model, weights as saved


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sharded_eval_counts_every_example_once(runs, strategy):
    ref = json.loads((runs[("none", 1)] / "metrics.json").read_text())
    dist = json.loads((runs[(strategy, 1)] / "metrics.json").read_text())
    assert dist["base"]["n"] == ref["base"]["n"] == 33  # odd: ranks hold unequal shares
    # every rank scores several batches of its own (evaluation raises on a gap or a double count)
    assert [len(eval_batches(np.ones(33), EVAL_BATCH, 2, r)) for r in (0, 1)] == [4, 3]
    for key in ("accuracy", "f1", "confusion"):
        assert dist["base"][key] == ref["base"][key]
    assert dist["base"]["loss"] == pytest.approx(ref["base"]["loss"], abs=1e-6)
    assert dist["train"]["world_size"] == 2 and dist["train"]["strategy"] == strategy


def test_hybrid_mesh_fsdp_inside_ddp_across(tiny_bert, tiny_data, tmp_path, runs):
    # 4 processes, replicas=2: two shard groups of 2, so each weight is really split, and replicated
    out = tmp_path / "hsdp"
    p = run_torchrun(4, *_args(tiny_bert, tiny_data, out, "train.batch_size=2", "distributed.strategy=fsdp",
                               "distributed.replicas=2"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = runs[("none", 1)]
    assert _losses(out) == pytest.approx(_losses(ref), abs=1e-5)
    a, b = load_file(ref / "tuned" / "model.safetensors"), load_file(out / "tuned" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["world_size"] == 4
    assert m["tuned"]["accuracy"] == json.loads((ref / "metrics.json").read_text())["tuned"]["accuracy"]


def test_fsdp_bf16_metrics_are_those_of_the_fp32_snapshots(tiny_bert, tiny_data, tmp_path):
    # FSDP's mixed precision runs forward on bf16 copies of the weights; metrics.json must score
    # base/ and tuned/ as saved (fp32 under bf16 autocast, as one process would) and say what trained
    out, loads = tmp_path / "fsdp-bf16", tmp_path / "loads"
    p = run_torchrun(2, *_args(tiny_bert, tiny_data, out, "train.batch_size=4", "distributed.strategy=fsdp",
                               "train.precision=bf16"), env=faults(log_loads=loads))
    assert p.returncode == 0, p.stderr[-3000:]
    # the snapshots are scored sharded: rank 0 alone reads them whole
    snapshot_loads = sorted(line for line in loads.read_text().splitlines() if not line.endswith(tiny_bert))
    assert [line.split()[0] for line in snapshot_loads] == ["0", "0"], snapshot_loads
    m = json.loads((out / "metrics.json").read_text())
    data = DataConfig(source=tiny_data, max_length=32)
    for side in ("base", "tuned"):
        alone = evaluate_pretrained(str(out / side), data, "test", batch_size=EVAL_BATCH, precision_name="bf16")
        assert m[side]["accuracy"] == alone["accuracy"] and m[side]["confusion"] == alone["confusion"], side
        assert m[side]["loss"] == pytest.approx(alone["loss"], abs=1e-6), side
    assert m["as_trained"]["what"] == "FSDP forward on bf16 copies of the weights, on the eval split"
    assert m["as_trained"]["tuned"]["n"] == 33


def test_two_nodes_over_c10d_rendezvous(tiny_bert, tiny_data, tmp_path):
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "twonode"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=twonode", "launch/train.py",
         *_args(tiny_bert, tiny_data, out, "train.batch_size=4", "distributed.strategy=ddp")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["world_size"] == 2 and (out / "tuned" / "model.safetensors").exists()


def test_a_failing_rank_ends_the_job_fast_and_says_which(tiny_bert, tiny_data, tmp_path):
    # a site hook makes rank 1's third loss computation raise; rank 0 would otherwise wait for it
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.nn.functional as F\n"
        "    real, calls = F.cross_entropy, []\n"
        "    def broken(*a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            raise RuntimeError('injected failure on this rank')\n"
        "        return real(*a, **k)\n"
        "    F.cross_entropy = broken\n")
    start = time.monotonic()
    p = run_torchrun(2, *_args(tiny_bert, tiny_data, tmp_path / "out", "train.batch_size=4",
                               "distributed.strategy=ddp"), env={"PYTHONPATH": str(hook)}, timeout=120)
    elapsed = time.monotonic() - start
    assert p.returncode != 0
    assert "rank 1: failed: RuntimeError: injected failure on this rank" in p.stderr
    assert elapsed < 60
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["distributed.strategy=none"], "torchrun started 2 processes but distributed.strategy=none"),
    (["distributed.strategy=fsdp", "distributed.replicas=3"], "distributed.replicas=3 does not divide the 2 processes"),
    (["distributed.strategy=ddp", "data.train_size=6"], "6 training examples cannot fill one step of 8"),
])
def test_bad_combinations_stop_before_work_with_one_line(tiny_bert, tiny_data, tmp_path, extra, message):
    p = run_torchrun(2, *_args(tiny_bert, tiny_data, tmp_path / "out", "train.batch_size=4", *extra))
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_decoder_with_activation_checkpointing_matches_one_process(tiny_data, tmp_path, strategy):
    import tiny
    llama = tiny.make_model(tmp_path / "llama", "llama")
    ref, dist = tmp_path / "ref", tmp_path / strategy
    extra = ("train.activation_checkpointing=true",)
    p = run_cli("launch/train.py", *_args(llama, tiny_data, ref, "train.batch_size=8", *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_torchrun(2, *_args(llama, tiny_data, dist, "train.batch_size=4", f"distributed.strategy={strategy}",
                               *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(dist) == pytest.approx(_losses(ref), abs=1e-5)


def test_fsdp_shards_an_architecture_with_lists_of_lists(tiny_data, tmp_path):
    # Funnel nests its layers in ModuleLists of ModuleLists. Its pooling sees the padding, so one
    # process's batches of 8 differ from two ranks' batches of 4: DDP on the same batches is the reference
    import tiny
    funnel = tiny.make_model(tmp_path / "funnel", "funnel")
    out = {}
    for strategy in ("ddp", "fsdp"):
        out[strategy] = tmp_path / strategy
        p = run_torchrun(2, *_args(funnel, tiny_data, out[strategy], "train.batch_size=4", "train.max_steps=4",
                                   f"distributed.strategy={strategy}"))
        assert p.returncode == 0, p.stderr[-3000:]
    assert len(_losses(out["ddp"])) == 4 and _losses(out["fsdp"]) == pytest.approx(_losses(out["ddp"]), abs=1e-5)
    a, b = (load_file(out[s] / "tuned" / "model.safetensors") for s in ("ddp", "fsdp"))
    assert set(a) == set(b)
    # a key bias moves no softmax: its gradient is rounding noise, which Adam scales up to lr-sized steps
    for k in (k for k in a if not k.endswith("k_head.bias")):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
