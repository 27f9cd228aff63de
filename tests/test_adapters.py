"""LoRA and QLoRA on tiny models: what trains, what is saved, and that every reload predicts the same."""
import json
import re
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import faults, run_cli, run_torchrun, tiny_overrides
from engine import adapters, loop, modeling
from engine.distributed import Dist
from engine.errors import AdapterError, RecipeError
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe

# GPT-2: its attention is a transformers Conv1D (weight stored transposed), 4-bit as a Linear4bit
ARCHS = ["distilbert", "bert", "roberta", "gpt2"]
HEADS = {"distilbert": ["classifier", "pre_classifier"], "bert": ["classifier"], "roberta": ["classifier"],
         "gpt2": ["score"]}
TARGETS = {"distilbert": ["q_lin", "v_lin"], "bert": ["query", "value"], "roberta": ["query", "value"],
           "gpt2": ["c_attn"]}
TEXTS = ["great wonderful superb film", "awful boring terrible film", "the plot was fine but dull",
         "a really brilliant and enjoyable story", "this movie was quite poor"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Tiny models 64 wide (bitsandbytes' CPU kernels need multiples of 64), with 4,000 embedding
    rows so that, as in real models, the body dwarfs the adapters and the head, and random weights
    large enough that adapters on a frozen random body can learn the task."""
    return {arch: tiny.make_model(tmp_path_factory.mktemp(arch), arch, hidden=64, vocab_size=4000, init_range=0.1)
            for arch in ARCHS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny.make_data(tmp_path_factory.mktemp("data"), n_train=192, n_test=33)


def run(model, data, out, method, *extra):
    """finetune(), keeping the model object that trained and its weights before training."""
    seen = {}
    real = loop.train

    def spy(model, *args, **kwargs):
        seen["model"] = model
        seen["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real(model, *args, **kwargs)

    recipe = load_recipe(None, tiny_overrides(model, data, out) + [
        f"peft.method={method}", "train.epochs=6", "train.lr=1e-2", "train.precision=fp32", *extra])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train", spy)
        report = finetune(recipe)
    return recipe, report, seen


def batch(folder):
    from transformers import AutoTokenizer
    return dict(AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt"))


@torch.no_grad()
def logits(model, inputs):
    model.eval()
    return model(**inputs).logits.float()


def load_fp(folder):
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)


def head_state(model, head):
    """The trained head of a PEFT model: the copy PEFT trains, not the original it keeps aside."""
    inner = model.base_model.model
    return {f"{h}.{k}": v for h in head
            for k, v in getattr(inner, h).modules_to_save["default"].state_dict().items()}


@pytest.fixture(scope="module")
def lora_runs(wide, data, tmp_path_factory):
    return {arch: _run_in(tmp_path_factory, wide[arch], data, f"lora-{arch}", "lora") for arch in ARCHS}


@pytest.fixture(scope="module")
def qlora_runs(wide, data, tmp_path_factory):
    return {arch: _run_in(tmp_path_factory, wide[arch], data, f"qlora-{arch}", "qlora") for arch in ARCHS}


def _run_in(factory, model, data, name, method, *extra):
    out = factory.mktemp(name)
    recipe, report, seen = run(model, data, out, method, *extra)
    return SimpleNamespace(out=out, recipe=recipe, report=report, model=seen["model"], before=seen["before"])


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_round_trip_and_head(arch, lora_runs):
    from peft import PeftModel
    r = lora_runs[arch]
    inputs = batch(r.out / "base")
    trained = logits(r.model, inputs)
    via_adapter = PeftModel.from_pretrained(load_fp(r.out / "base"), r.out / "adapter")
    merged = load_fp(r.out / "tuned")
    torch.testing.assert_close(logits(via_adapter, inputs), trained, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(merged, inputs), trained, atol=1e-4, rtol=0)
    # it learnt: the adapter is not a no-op and the merged model is good
    assert (logits(load_fp(r.out / "base"), inputs) - trained).abs().max() > 1e-2
    assert r.report["tuned"]["accuracy"] >= 0.75 > r.report["base"]["accuracy"]
    assert r.report["train"]["final_loss"] < 0.4

    # the head comes back as trained, in the adapter and in tuned/, never as initialised
    head = HEADS[arch]
    assert r.report["peft"]["modules_to_save"] == head and r.report["peft"]["target_modules"] == TARGETS[arch]
    want = head_state(r.model, head)
    base = load_file(r.out / "base" / "model.safetensors")
    tuned = load_file(r.out / "tuned" / "model.safetensors")
    reloaded = head_state(via_adapter, head)
    for key, value in want.items():
        assert not torch.equal(value, base[key]), f"{key} did not train"
        assert torch.equal(reloaded[key], value), key
        assert torch.equal(tuned[key], value), key


def test_adapter_files_and_pipeline(lora_runs):
    from transformers import pipeline
    r = lora_runs["distilbert"]
    assert sorted(p.name for p in (r.out / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "run_settings.json"]
    config = json.loads((r.out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == str(r.out / "base")
    saved = load_file(r.out / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("pre_classifier" in k for k in saved)
    assert all("lora_" in k or "classifier" in k for k in saved)  # no body weight in the adapter
    clf = pipeline("text-classification", model=str(r.out / "tuned"))
    assert clf("great wonderful superb film")[0]["label"] == "LABEL_1"
    m = json.loads((r.out / "metrics.json").read_text())
    assert m["peft"]["adapter"]["sha256"] and m["train"]["peak_memory_mb"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_share(arch, lora_runs, qlora_runs):
    for runs in (lora_runs, qlora_runs):
        r = runs[arch]
        params = r.report["params"]
        assert 0 < params["trainable_share"] < 0.05
        trainable = sum(p.numel() for p in r.model.parameters() if p.requires_grad)
        assert params["trainable_params"] == trainable
        names = [n for n, p in r.model.named_parameters() if p.requires_grad]
        assert all("lora_" in n or ".modules_to_save." in n for n in names)
    # the 4-bit body counts as the values it stands for, not its packed bytes
    assert qlora_runs[arch].report["params"] == lora_runs[arch].report["params"]


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_round_trip_and_frozen_4bit_body(arch, qlora_runs):
    import bitsandbytes as bnb
    from peft import PeftModel
    r = qlora_runs[arch]
    head = HEADS[arch]
    # the targeted layers (and every other body linear) are 4-bit; the head is not
    modules = dict(r.model.base_model.model.named_modules())
    targets = [n for n in modules if n.rsplit(".", 1)[-1] in TARGETS[arch]]
    assert targets and all(isinstance(modules[n].base_layer, bnb.nn.Linear4bit) for n in targets)
    assert all(not isinstance(m, bnb.nn.Linear4bit) for n, m in modules.items() if n.split(".")[0] in head)
    # training moved the adapters and the head, and nothing of the body
    after = r.model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], r.before[k])}
    assert moved and all("lora_" in k or ".modules_to_save." in k for k in moved)
    assert any("lora_B" in k for k in moved) and any(".modules_to_save." in k for k in moved)

    inputs = batch(r.out / "base")
    trained = logits(r.model, inputs)
    # base/ + adapter on its own 4-bit base predicts as the model did at the end of training
    quantized = adapters.load_quantized(r.out / "base", r.recipe, head, Dist())
    via_adapter = PeftModel.from_pretrained(quantized, r.out / "adapter")
    torch.testing.assert_close(logits(via_adapter, inputs), trained, atol=1e-4, rtol=0)
    reloaded = head_state(via_adapter, head)
    for key, value in head_state(r.model, head).items():
        assert torch.equal(reloaded[key], value), key
    # tuned/ is the adapter merged into the full-precision base/, and stays full precision
    on_fp = PeftModel.from_pretrained(load_fp(r.out / "base"), r.out / "adapter")
    merged = load_fp(r.out / "tuned")
    assert all(not isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), logits(on_fp, inputs), atol=1e-4, rtol=0)
    tuned = load_file(r.out / "tuned" / "model.safetensors")
    for key, value in head_state(r.model, head).items():
        assert torch.equal(tuned[key], value), key


def test_qlora_metrics_are_those_of_the_snapshots(qlora_runs, data):
    from engine.evaluation import evaluate_pretrained
    r = qlora_runs["bert"]
    m = json.loads((r.out / "metrics.json").read_text())
    assert set(m["peft"]["quantized"]) == {"base", "tuned"}
    assert m["peft"]["quantized"]["tuned"]["accuracy"] >= 0.75
    for side in ("base", "tuned"):
        scored = evaluate_pretrained(str(r.out / side), r.recipe.data, "test")
        assert scored["accuracy"] == pytest.approx(m[side]["accuracy"])
        assert scored["loss"] == pytest.approx(m[side]["loss"], abs=1e-5)


def test_quantization_config_follows_precision_and_strategy():
    head = ["pre_classifier", "classifier"]
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        q = adapters.quantization_config(precision, head, Dist())
        assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
        assert q.bnb_4bit_compute_dtype == dtype and q.llm_int8_skip_modules == head
        assert q.bnb_4bit_quant_storage == torch.uint8
        assert adapters.quantization_config(precision, head, Dist(strategy="fsdp")).bnb_4bit_quant_storage == dtype


def test_defaults_per_architecture_and_all_linear_keeps_the_head_whole(wide):
    other = SimpleNamespace(config=SimpleNamespace(model_type="funnel"))  # no default of its own
    assert adapters.target_modules(other, None) == "all-linear"
    assert adapters.target_modules(other, ["a", "b"]) == ["a", "b"]
    # all-linear on RoBERTa: LoRA on every body linear, none inside classifier.dense/out_proj
    recipe = load_recipe(None, [f"model.name_or_path={wide['roberta']}", "peft.method=lora",
                                "peft.target_modules=all-linear"])
    model = load_fp(wide["roberta"])
    assert adapters.head_modules(model) == ["classifier"]
    peft_model = adapters.attach(model, recipe, None, None)
    lora = {n.split(".lora_")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert len(lora) == 2 * 6  # q, k, v, attention out, intermediate, output in 2 layers
    assert not any(".classifier." in n for n in lora)


# offline clusters set HF_HUB_OFFLINE=1: libraries that then warn on stderr must stay quiet there too
@pytest.mark.parametrize("offline", [False, True], ids=["online", "HF_HUB_OFFLINE"])
def test_bad_targets_stop_with_one_line(wide, data, tmp_path, offline):
    env = {"HF_HUB_OFFLINE": "1" if offline else "0"}
    p = run_cli("launch/train.py", "--recipe", "recipes/imdb_distilbert_lora.yaml",
                *tiny_overrides(wide["distilbert"], data, tmp_path / "bad"), "data.label_names=null",
                "data.train_size=null", "data.eval_size=null", "peft.target_modules=[nope]", env=env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0], p.stderr
    for override, expected in (("peft.dropout=1.5", "'peft.dropout' must be in [0, 1)"),
                               ("peft.alpha=0", "'peft.alpha' must be > 0")):
        with pytest.raises(RecipeError, match=re.escape(expected)):
            load_recipe(None, [override])


@pytest.fixture(scope="module")
def one_process(wide, data, tmp_path_factory):
    """The reference for the 2-process runs: batch 8 in one process, adapter dropout off (its
    masks are drawn per rank, so with it on the runs would differ by design)."""
    return {method: _run_in(tmp_path_factory, wide["bert"], data, f"one-{method}", method, "peft.dropout=0",
                            "train.epochs=2") for method in ("lora", "qlora")}


@pytest.mark.parametrize("strategy, method", [("ddp", "lora"), ("fsdp", "lora"), ("ddp", "qlora"), ("fsdp", "qlora")])
def test_two_processes_train_save_and_reload_like_one(strategy, method, one_process, wide, data, tmp_path):
    from peft import PeftModel
    ref = one_process[method]
    out = tmp_path / "run"
    p = run_torchrun(2, "--recipe", "/dev/null", *tiny_overrides(wide["bert"], data, out), f"peft.method={method}",
                     "peft.dropout=0", "train.epochs=2", "train.lr=1e-2", "train.precision=fp32",
                     "train.batch_size=4", f"distributed.strategy={strategy}")
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(ref.out / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    inputs = batch(out / "base")
    via_adapter = PeftModel.from_pretrained(load_fp(out / "base"), out / "adapter")
    torch.testing.assert_close(logits(load_fp(out / "tuned"), inputs), logits(via_adapter, inputs), atol=1e-4, rtol=0)
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["strategy"] == strategy and m["peft"]["method"] == method
    assert m["tuned"]["loss"] == pytest.approx(ref.report["tuned"]["loss"], abs=1e-4)


def test_qlora_keeps_activation_checkpointing(wide):
    # QLoRA trains a model it loads itself: the recipe's checkpointing must reach that one too
    from engine.distributed import Dist
    recipe = load_recipe(None, [f"model.name_or_path={wide['bert']}", "peft.method=qlora",
                                "train.activation_checkpointing=true"])
    model = adapters.attach(load_fp(wide["bert"]), recipe, wide["bert"], Dist())
    assert model.base_model.model.is_gradient_checkpointing
    x = batch(wide["bert"])
    model.train()
    model(**x).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_killed_then_resumed_is_bit_identical(method, wide, data, tmp_path):
    # a 4-bit layer lists quantisation constants in its state_dict that load_state_dict does not
    # take back: resuming must restore the adapters and the head, and the frozen body as it was
    extra = ["train.epochs=2", "checkpoint.every=5", "train.eval_every=0", f"peft.method={method}"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    finetune(load_recipe(None, tiny_overrides(wide["bert"], data, ref) + extra))
    args = ["launch/train.py", "--recipe", "/dev/null", *tiny_overrides(wide["bert"], data, out), *extra]
    p = run_cli(*args, env=faults(kill_at_step=13))
    assert p.returncode == -signal.SIGKILL and not (out / "adapter").exists()
    p = run_cli(*args, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"].endswith("step-10")
    for f in ("adapter/adapter_model.safetensors", "tuned/model.safetensors"):
        a, b = load_file(ref / f), load_file(out / f)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f


def test_the_recipes_lora_settings_reach_peft(tiny_bert, tmp_path):
    import dataclasses

    from engine.adapters import check_targets, lora_config
    recipe = load_recipe(None, [f"model.name_or_path={tiny_bert}", "data.source=d", f"output_dir={tmp_path}",
                                "peft.method=lora", "peft.r=4", "peft.alpha=8", "peft.dropout=0.25"])
    model = modeling.load_model(recipe.model, ["neg", "pos"])
    cfg = lora_config(model, recipe)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.25)
    assert list(cfg.modules_to_save) == ["classifier"] and list(cfg.exclude_modules) == ["classifier"]
    # a target names a whole layer name or its last parts, never a piece of a word
    for partial in (["uery"], ["attention.self.query", "alue"]):
        bad = dataclasses.replace(recipe, peft=dataclasses.replace(recipe.peft, target_modules=partial))
        with pytest.raises(AdapterError, match=f"'{partial[-1]}' matches no layer"):
            check_targets(model, bad)
