"""Wrapping decisions that need no process group; the 2-process runs are in tests/distributed/."""
import pytest
import torch

import tiny
from engine.config import DistributedConfig
from engine.distributed import Dist, init, transformer_blocks
from engine.errors import DistributedSetupError


@pytest.mark.parametrize("arch, block", [("bert", "BertLayer"), ("distilbert", "TransformerBlock"),
                                          ("roberta", "RobertaLayer")])
def test_blocks_are_found_without_a_per_architecture_list(tmp_path, arch, block):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny.make_model(tmp_path, arch))
    names = [type(b).__name__ for b in transformer_blocks(model)]
    assert names.count(block) == 2  # each layer is its own FSDP unit
    assert set(names) <= {block, *(model._no_split_modules or ())}  # plus embeddings, where declared


def test_one_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = init(DistributedConfig(), num_threads=1)
    assert (d.rank, d.world, d.is_main, d.active) == (0, 1, True, False)
    assert torch.get_num_threads() == 1
    t = torch.ones(2)
    assert d.all_reduce_sum(t) is t and d.all_gather_object(5) == [5]


def test_torchrun_without_a_strategy_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="set distributed.strategy=ddp or fsdp"):
        init(DistributedConfig(strategy="none"))


def test_unwrap_returns_the_model_for_plain_modules():
    m = torch.nn.Linear(2, 2)
    assert Dist.unwrap(m) is m


def test_what_differs_between_strategies_is_answered_by_dist():
    plain, ddp, fsdp = Dist(), Dist(strategy="ddp", rank=1, world=2), Dist(strategy="fsdp", rank=1, world=2)
    # every strategy is data-parallel over all processes: each rank sees its own examples
    assert [(d.dp_world, d.dp_rank) for d in (plain, ddp, fsdp)] == [(1, 0), (2, 1), (2, 1)]
    assert [d.shards_state for d in (plain, ddp, fsdp)] == [False, False, True]  # each rank saves its shard
    # only FSDP's mixed precision runs forward on low-precision copies of the saved weights
    assert [d.forward_casts_weights(torch.bfloat16) for d in (plain, ddp, fsdp)] == [False, False, True]
    assert not fsdp.forward_casts_weights(None)
    assert [d.packed_weight_dtype(torch.float16) for d in (plain, ddp, fsdp)] == [None, None, torch.float16]

    class Wrapper(torch.nn.Module):  # what DDP looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

        def no_sync(self):
            raise AssertionError("not called")

    inner = torch.nn.Linear(2, 2)
    wrapped = Wrapper(inner)
    assert ddp.eval_module(wrapped) is inner  # DDP's forward adds nothing at eval
    assert fsdp.eval_module(wrapped) is wrapped  # FSDP's forward gathers the shards: it must run


@pytest.mark.parametrize("block_sizes", [[1, 1, 1], [4, 4, 4]])
def test_blocks_inside_lists_of_lists_are_the_layers(block_sizes):
    # Funnel keeps its layers in encoder.blocks[block][layer]: the units are every FunnelLayer
    # (never an inner ModuleList, which fully_shard refuses, nor one block's layers only)
    from transformers import AutoConfig, AutoModelForSequenceClassification
    spec = {**tiny.ARCH["funnel"], "block_sizes": block_sizes}
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["FunnelLayer"] * sum(block_sizes)
    assert {id(b) for b in blocks} == {id(layer) for inner in model.funnel.encoder.blocks for layer in inner}


@pytest.mark.parametrize("cpu_offload", [True, False])
def test_a_snapshots_buffers_are_broadcast_from_the_device_on_every_rank(tmp_path, monkeypatch, cpu_offload):
    """The final re-scoring under FSDP: a rank other than 0 builds the snapshot on the meta device
    and receives its buffers from rank 0, whose buffers fully_shard put on the device. Under
    cpu_offload the shards live in host memory, but the buffers must still be on the device: a CPU
    buffer against rank 0's CUDA one fails in NCCL, which takes CUDA tensors only. No CUDA here:
    the meta device stands in for it, and the process group is faked."""
    import torch.distributed.checkpoint.state_dict as dcp
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny.make_model(tmp_path, "bert"))
    device = torch.device("meta")
    d = Dist("fsdp", rank=1, world=2, device=device, cfg=DistributedConfig(strategy="fsdp", cpu_offload=cpu_offload))
    monkeypatch.setattr(d, "broadcast_object", lambda obj: config)  # rank 0's answer
    monkeypatch.setattr(d, "_fully_shard", lambda model, dtype: model)
    monkeypatch.setattr(dcp, "set_model_state_dict", lambda *a, **k: None)
    sent = []
    monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src: sent.append(t.device))
    model = d.shard_snapshot(None, AutoModelForSequenceClassification.from_config)
    assert len(sent) == len(list(model.buffers())) > 0 and set(sent) == {device}
    assert {p.device for p in model.parameters()} == {torch.device("cpu") if cpu_offload else device}
