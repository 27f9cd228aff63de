"""The family matrix: every architecture people fine-tune for sentiment trains, shards, adapts and reloads.

Each family (tests/tiny.py, 64 wide so bitsandbytes' CPU 4-bit kernels apply) gets two runs that
together cover the engine: one process with full fine-tuning and activation checkpointing, and two
processes (torchrun, gloo) with QLoRA (or LoRA) on the family's default targets under DDP or FSDP,
alternating between families. Both snapshots are reloaded by `pipeline()`, which must answer the
class names of the model's own config: the data's labels are bare integers.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import run_cli, run_torchrun, tiny_overrides
from engine import adapters
from engine.config import ModelConfig
from engine.distributed import transformer_blocks
from engine.finetune import finetune
from engine.modeling import ModelError, load_model
from engine.recipe_yaml import load_recipe

NAMES = {0: "negative", 1: "positive"}
FAMILIES = tiny.FAMILIES
# transformers has no SDPA kernel for these: `auto` runs their eager attention
EAGER = {"deberta-v2", "mpnet"}
# transformers has no activation checkpointing for these: the engine refuses with one line
NO_CHECKPOINTING = {"albert", "mpnet"}
# two-process strategy, alternating so that both strategies meet encoders and decoders
STRATEGY = {family: ("fsdp", "ddp")[i % 2] for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = tiny.make_model(tmp_path_factory.mktemp(family), family, hidden=64, id2label=NAMES)
        return made[family]
    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny.make_data(tmp_path_factory.mktemp("data"), n_train=192, n_test=33)


def answers(folder, text):
    from transformers import pipeline
    return pipeline("text-classification", model=str(folder), device="cpu")(text)[0]["label"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_finds_the_blocks(family, models):
    model = load_model(ModelConfig(name_or_path=models(family)), list(NAMES.values()))
    layers = max(len(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    blocks = transformer_blocks(model)
    if family == "albert":  # one layer group, run at every depth: it is the one block
        assert [type(b).__name__ for b in blocks] == ["AlbertLayerGroup"]
    else:
        assert layers == 2 and sum(len(list(b.parameters())) > 0 for b in blocks) >= layers


@pytest.mark.parametrize("family", FAMILIES)
def test_one_process_full_finetuning_reloads_with_the_models_names(family, models, data, tmp_path, capsys):
    args = tiny_overrides(models(family), data, tmp_path / "run")
    checkpointing = ["train.activation_checkpointing=true"]
    if family in NO_CHECKPOINTING:
        with pytest.raises(ModelError, match="does not support activation checkpointing; set "
                                             "train.activation_checkpointing=false"):
            finetune(load_recipe(None, tiny_overrides(models(family), data, tmp_path / "refused") + checkpointing))
        assert not (tmp_path / "refused" / "metrics.json").exists()
        checkpointing = []
    capsys.readouterr()
    report = finetune(load_recipe(None, args + checkpointing + ["train.lr=1e-3"]))
    said = capsys.readouterr().out
    assert report["data"]["labels"] == ["negative", "positive"]
    assert report["model"]["attn_implementation"] == ("eager" if family in EAGER else "sdpa")
    first = next(line for line in said.splitlines() if line.startswith("train "))
    assert first.endswith("attention " + report["model"]["attn_implementation"])
    assert report["tuned"]["accuracy"] > 0.8, report["evals"]
    assert answers(tmp_path / "run" / "tuned", "great wonderful superb film") == "positive"
    assert answers(tmp_path / "run" / "tuned", "awful boring terrible film") == "negative"


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_qlora_on_default_targets(family, models, data, tmp_path):
    strategy, out = STRATEGY[family], tmp_path / "run"
    p = run_torchrun(2, "--recipe", "/dev/null", *tiny_overrides(models(family), data, out),
                     f"distributed.strategy={strategy}", "peft.method=qlora", "train.lr=1e-2",
                     "train.max_steps=8", "checkpoint.keep=0")
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["train"]["world_size"], m["train"]["strategy"], m["peft"]["method"]) == (2, strategy, "qlora")
    default = adapters.DEFAULT_TARGETS[tiny.ARCH[family]["model_type"]]
    if default == "all-linear":  # PEFT lists what it matched: every body linear, attention and MLP
        leaves = {name.rsplit(".", 1)[-1] for name in m["peft"]["target_modules"]}
        assert {"o_proj", "down_proj"} <= leaves and ("q_proj" in leaves or "qkv_proj" in leaves), leaves
    else:
        assert m["peft"]["target_modules"] == sorted(default)
    base, tuned = load_file(out / "base" / "model.safetensors"), load_file(out / "tuned" / "model.safetensors")
    assert set(base) == set(tuned)
    changed = [k for k in base if k.endswith(".weight") and not torch.equal(base[k], tuned[k])]
    head = set(m["peft"]["modules_to_save"])
    assert any(k.split(".")[0] not in head for k in changed), "no adapter was merged into the body"
    assert answers(out / "tuned", "great wonderful superb film") in NAMES.values()


def test_albert_shared_layer_under_fsdp_matches_one_process(models, data, tmp_path):
    """ALBERT runs one layer group at every depth: FSDP shards it as one unit, gathered at each use;
    its gradient, summed over the depths, must be that of one process."""
    def losses(out):
        rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    args = ["train.log_every=1", "train.max_steps=8", "checkpoint.keep=0", "train.lr=1e-3"]
    one, two = tmp_path / "one", tmp_path / "fsdp"
    model = models("albert")
    p = run_cli("launch/train.py", "--recipe", "/dev/null", *tiny_overrides(model, data, one), *args,
                "train.batch_size=8")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_torchrun(2, "--recipe", "/dev/null", *tiny_overrides(model, data, two), *args, "train.batch_size=4",
                     "distributed.strategy=fsdp")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(losses(one)) == 8 and losses(two) == pytest.approx(losses(one), abs=1e-5)
