"""LoRA and QLoRA: which layers get adapters, which head trains, 4-bit loading, and the exports.

PEFT changes the model, never the loop: `attach` returns a model whose only trainable parameters
are the low-rank adapters and the classification head, and the loop trains it like any other.
`export` then writes `adapter/` (PEFT's format) and `tuned/` (the adapter merged into the
full-precision base/, loadable by `pipeline()` like any tuned snapshot).
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import torch
from torch import nn

from engine import checkpoint, modeling, run_settings
from engine.config import Recipe
from engine.errors import AdapterError
from engine.precision import DTYPES

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# the layers that get adapters when peft.target_modules is not set, by config.model_type. Encoders
# and GPT-2: the attention's query and value projections (LoRA's paper), or the fused projection that
# holds them. Decoder LLMs, and any architecture not listed: every linear layer of the body
# ("all-linear", as the QLoRA paper found best for LLMs)
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],  # one layer shared across the depth: one set of adapters
    "mpnet": ["q", "v"],
    "modernbert": ["Wqkv"],
    "gpt2": ["c_attn"],  # a transformers Conv1D (weight stored transposed); PEFT handles it
    **dict.fromkeys(("llama", "qwen2", "mistral", "gemma3_text", "phi3"), "all-linear"),
}
# bitsandbytes' NF4 block: its CPU kernels need the input width of every 4-bit layer to be a multiple
NF4_BLOCK = 64


# --------------------------------------------------------------------------------------------
# What trains


def head_modules(model: nn.Module) -> list[str]:
    """The classification head: every child of the classifier that is not its pretrained body.

    transformers builds `XForSequenceClassification` as the body (`base_model_prefix`) plus head
    modules beside it, so this finds DistilBERT's `pre_classifier` + `classifier`, BERT's
    `classifier` and RoBERTa's `classifier` (dense + out_proj) without a per-architecture list.
    """
    body = getattr(model, "base_model_prefix", "")
    heads = [name for name, child in model.named_children()
             if name != body and any(True for _ in child.parameters())]
    if not heads:
        raise AdapterError(f"{type(model).__name__}: no classification head found beside the body "
                           f"'{body}'; LoRA needs a head to train")
    return heads


def target_modules(model: nn.Module, wanted: list[str] | None) -> list[str] | str:
    if wanted == ["all-linear"]:  # PEFT's keyword, which it reads only as a string
        return "all-linear"
    if wanted:
        return list(wanted)
    default = DEFAULT_TARGETS.get(model.config.model_type, "all-linear")
    return default if isinstance(default, str) else list(default)


def lora_config(model: nn.Module, recipe: Recipe):
    from peft import LoraConfig

    cfg = recipe.peft
    head = head_modules(model)
    return LoraConfig(
        task_type="SEQ_CLS", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=target_modules(model, cfg.target_modules),
        # the head is trained whole and saved with the adapter: reloading never brings back the
        # random head that from_pretrained would initialise
        modules_to_save=head,
        # "all-linear" or a broad name ("dense") would otherwise put LoRA inside the head too
        exclude_modules=head,
    )


# --------------------------------------------------------------------------------------------
# Building the model that trains


def quantization_config(precision: str, head: list[str], dist):
    from transformers import BitsAndBytesConfig

    compute = DTYPES[precision] or torch.float32  # fp32 autocasts nothing: 4-bit layers compute in fp32
    extra = {}
    storage = dist.packed_weight_dtype(compute)  # what the strategy needs the packed 4-bit data in
    if storage is not None:
        extra["bnb_4bit_quant_storage"] = storage
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        # the head trains in full precision: a 4-bit weight cannot require gradients
        llm_int8_skip_modules=head, **extra)


def load_quantized(folder: str | Path, recipe: Recipe, head: list[str], dist):
    """The classifier saved in `folder` (base/), its linear layers quantised to 4-bit NF4, on `dist.device`
    and stored as the strategy needs."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise AdapterError("peft.method=qlora needs bitsandbytes: pip install bitsandbytes") from None
    mcfg = dataclasses.replace(recipe.model, name_or_path=str(folder), revision=None)
    model = modeling.load_model(
        mcfg, quantization_config=quantization_config(recipe.train.precision, head, dist),
        dtype=torch.float32, device_map={"": dist.device})
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if dist.device.type == "cpu" and module.in_features % NF4_BLOCK:
                raise AdapterError(f"{recipe.model.name_or_path}: layer '{name}' has {module.in_features} "
                                   f"inputs; bitsandbytes' CPU 4-bit kernels need a multiple of {NF4_BLOCK}")
            # with this set, an eval forward on an AVX512-BF16 CPU repacks the weight in place into
            # an inference-only layout; the next training forward then fails (or, worse, passes no
            # gradient through the layer). Train and eval must run the same kernel.
            module.support_avx512bf16_for_cpu = False
    return model


# the methods that put PEFT adapters on the model and export adapter/ (head trains the head alone)
ADAPTER_METHODS = ("lora", "qlora")


def freeze_body(model: nn.Module) -> nn.Module:
    """peft.method=head: only the classification head trains (a linear probe on the pretrained
    features). The head is what LoRA trains whole (`head_modules`): BERT's `classifier` (its pooler
    is part of the body, so it stays frozen), DistilBERT's `pre_classifier` + `classifier`,
    RoBERTa's `classifier` (dense + out_proj), a decoder's `score`."""
    head = head_modules(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".", 1)[0] in head)
    return model


def attach(model: nn.Module, recipe: Recipe, base_dir: str | Path, dist) -> nn.Module:
    """The model to train: LoRA on `model` itself, QLoRA on a 4-bit copy of base/, or (head) the
    model with its body frozen.

    For QLoRA base/ must already be on disk (rank 0 writes it; every rank reads it): quantising
    exactly that snapshot gives the 4-bit model the same head initialisation and weights.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    method = recipe.peft.method
    if method == "head":
        return freeze_body(model)
    head = head_modules(model)
    if method == "qlora":
        dist.barrier()
        model = load_quantized(base_dir, recipe, head, dist)
        # freezes the body and keeps the non-quantised weights in fp32; checkpointing is the
        # recipe's choice (train.activation_checkpointing), made on this new model like the first
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if recipe.train.activation_checkpointing:
            modeling.enable_activation_checkpointing(model)
    check_targets(model, recipe)
    try:
        peft_model = get_peft_model(model, lora_config(model, recipe))
    except ValueError as e:
        raise AdapterError(f"{recipe.model.name_or_path}: cannot attach LoRA "
                           f"({' '.join(str(e).split())[:300]})") from None
    check_trainable(peft_model, head)
    return peft_model


def check_targets(model: nn.Module, recipe: Recipe) -> None:
    """Every name in peft.target_modules must match a layer (PEFT only fails when none does)."""
    targets = target_modules(model, recipe.peft.target_modules)
    if isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise AdapterError(f"peft.target_modules: '{t}' matches no layer of {recipe.model.name_or_path} "
                               f"(its linear layers: {', '.join(leaves)})")


def saved_modules(peft_model: nn.Module) -> list[str]:
    """The modules trained whole and saved with the adapter (PEFT matches their names by suffix)."""
    from peft.utils.other import ModulesToSaveWrapper

    return sorted(name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
                  if isinstance(m, ModulesToSaveWrapper))


def check_trainable(peft_model: nn.Module, head: list[str]) -> None:
    """Only LoRA factors and the head train; anything else means the names matched too much."""
    wrapped = saved_modules(peft_model)
    if set(wrapped) != set(head):
        raise AdapterError(f"the trained-and-saved modules {sorted(wrapped)} are not exactly the "
                           f"classification head {head}")
    if not any("lora_" in name for name, _ in peft_model.named_parameters()):
        raise AdapterError("LoRA matched no layer: check peft.target_modules")


# --------------------------------------------------------------------------------------------
# Exports (rank 0)


def export(trained: nn.Module, state: dict, base: Path, dest: Path, tokenizer, recipe: Recipe) -> dict:
    """Write `dest/adapter/` and the merged `dest/tuned/` from the trained weights in `state`;
    the adapter goes on `base` (base/), and names it; its run_settings.json also holds base/'s
    weights digest, so it is never put on another base (engine/classifiers.py).

    The adapter is put on base/ reloaded in full precision, not on the model that trained: that
    is the same for LoRA, and for QLoRA it is the only way to a full-precision merge (merging into
    4-bit layers keeps them 4-bit). It also proves the adapter loads onto base/.
    """
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    config = copy.deepcopy(trained.peft_config["default"])
    config.inference_mode = False
    config.base_model_name_or_path = str(base)  # what the adapter goes on

    mcfg = dataclasses.replace(recipe.model, name_or_path=str(base), revision=None)
    fresh = get_peft_model(modeling.load_model(mcfg, dtype=torch.float32), config)
    adapter_state = get_peft_model_state_dict(fresh, state_dict=state)
    expected = get_peft_model_state_dict(fresh)
    if set(adapter_state) != set(expected):
        missing = sorted(set(expected) - set(adapter_state))[:3]
        raise RuntimeError(f"trained state lacks adapter weights, e.g. {missing}")
    loaded = set_peft_model_state_dict(fresh, adapter_state)
    if loaded.unexpected_keys:
        raise RuntimeError(f"adapter weights the model does not have: {loaded.unexpected_keys[:3]}")

    final = Path(dest) / "adapter"
    tmp = checkpoint.atomic_dir(final)
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        names = modeling.label_names_of(fresh.get_base_model())
        base_sha = checkpoint.file_sha256(Path(base) / checkpoint.WEIGHTS)
        run_settings.write(tmp, run_settings.settings_of(recipe, names, base_sha256=base_sha))
        checkpoint.commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    targets = config.target_modules
    info = {"adapter_sha256": checkpoint.file_sha256(final / ADAPTER_WEIGHTS),
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "modules_to_save": saved_modules(fresh)}
    merged = fresh.merge_and_unload()
    info["tuned_sha256"] = checkpoint.save_snapshot(merged, tokenizer, Path(dest) / "tuned", recipe=recipe)
    return info
