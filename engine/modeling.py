"""Load a sequence-classification model and its tokenizer by hub name or local folder."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, GgufConfig

from engine.config import ModelConfig
from engine.errors import MissingPackageError, ModelError, RecipeError
from engine.paths import resolve

# Importing bitsandbytes (peft does, for LoRA too; predict and evaluate for an adapter/) on an
# AVX512-BF16 CPU fetches an optional 4-bit kernel through the `kernels` package. bitsandbytes warns
# when that package is missing (its fallback works), or that it "could not verify publisher trust
# status"; with HF_HUB_OFFLINE=1 `kernels` warns that it skips the publisher check of the cached
# kernel. None is ours to act on, and a stray line would break the one-line error of bad input.
# Here, in the module every model load goes through, so every command gets it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)


def _location(cfg: ModelConfig) -> str:
    try:
        return resolve(cfg.name_or_path)
    except MissingPackageError as e:
        raise ModelError(str(e)) from None


def load_pretrained(what: str, fn, cfg: ModelConfig, **kwargs):
    where = _location(cfg)
    if cfg.gguf_file and not _is_snapshot(where, cfg.gguf_file):
        kwargs["gguf_file"] = cfg.gguf_file
        if what == "model":
            # unpacked to plain full-precision layers: packed GGUF layers neither train nor
            # save_pretrained, and base/ and tuned/ must be ordinary safetensors snapshots
            kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
    try:
        return fn(where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        msg = " ".join(str(e).split())[:300]
        raise ModelError(f"{cfg.name_or_path}: cannot load {what} ({e.__class__.__name__}: {msg})") from None


def _is_snapshot(where: str, gguf_file: str) -> bool:
    """A save_pretrained folder (base/, tuned/) reloaded with the recipe's model section: the GGUF
    file it was first built from is not there, its safetensors are."""
    folder = Path(where).expanduser()
    return (folder / "config.json").is_file() and not (folder / gguf_file).exists()


def load_tokenizer(cfg: ModelConfig):
    tokenizer = load_pretrained("tokenizer", AutoTokenizer.from_pretrained, cfg)
    if tokenizer.pad_token is None:  # decoder LLMs ship without one; the classifier needs it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def attention_kwargs(cfg: ModelConfig) -> dict:
    """from_pretrained's attn_implementation argument: none for `auto`, since left unset
    transformers takes SDPA where the architecture has it and its eager default elsewhere."""
    if cfg.attn_implementation in (None, "auto"):
        return {}
    return {"attn_implementation": cfg.attn_implementation}


def load_model(cfg: ModelConfig, label_names: list[str] | None = None, tokenizer=None, **extra):
    """The pretrained body with a classification head sized for `label_names` (None: as saved).

    A head the checkpoint lacks is initialised from torch's RNG: seed before calling. `extra` goes
    to from_pretrained as is (QLoRA's quantization_config, dtype, device_map).
    """
    kwargs = dict(extra)
    if label_names is not None:
        kwargs.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    kwargs.update(attention_kwargs(cfg))
    try:
        model = load_pretrained("model", AutoModelForSequenceClassification.from_pretrained, cfg, **kwargs)
    except ModelError as e:
        if "attn_implementation" in kwargs and "attention implementation" in str(e):
            raise ModelError(f"{cfg.name_or_path}: model.attn_implementation={cfg.attn_implementation} is not "
                             f"supported by this architecture; use auto (or eager)") from None
        raise
    except RuntimeError as e:
        if "mismatched" not in str(e):
            raise
        raise ModelError(f"{cfg.name_or_path}: its classification head does not fit the "
                         f"{len(label_names)} classes of the data ({', '.join(label_names)})") from None
    if label_names is None and model.config.num_labels < 2:
        raise ModelError(f"{cfg.name_or_path}: not a classifier (config has {model.config.num_labels} label)")
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def model_from_config(config, cfg: ModelConfig):
    """The model `config` describes (a loaded model's), weights initialised, not loaded: built under
    torch.device("meta") by the ranks that receive their weights from another."""
    return AutoModelForSequenceClassification.from_config(
        config, attn_implementation=config._attn_implementation, trust_remote_code=cfg.trust_remote_code)


# the learned absolute-position tables, by the names transformers gives them (BERT and its kin,
# GPT-2, OPT/BART); rotary and relative-position models (Llama, ModernBERT, DeBERTa-v3) have none
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def max_positions(model) -> int | None:
    """How many tokens the model's position table holds; None when it has none (no such limit).

    RoBERTa-like tables (a padding_idx on the table: RoBERTa, XLM-R, MPNet) number positions from
    padding_idx + 1, so 514 rows hold 512; OPT/BART's learned tables skip their `offset` rows.
    """
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            start = module.padding_idx + 1 if module.padding_idx is not None else 0
            return module.num_embeddings - start - int(getattr(module, "offset", 0) or 0)
    return None


def check_max_length(model, max_length: int, name: str, key: str = "data.max_length") -> None:
    """Stop before any forward when a text cut to max_length would run past the position table."""
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise RecipeError(f"{key}={max_length} is past the {limit} positions of {name}; set it to {limit} or less")


def attn_implementation(model) -> str:
    """The attention kernel the loaded model runs (what `auto` chose)."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def config_label_names(cfg: ModelConfig) -> list[str] | None:
    """The class names the model's config gives, unless they are transformers' LABEL_i defaults.

    None when there are none, or the config cannot be read (loading the model says why later).
    """
    try:
        config = load_pretrained("config", AutoConfig.from_pretrained, cfg)
    except ModelError:
        return None
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)] if id2label else []
    if not names or any(re.fullmatch(r"LABEL_\d+", n) for n in names) or len(set(names)) != len(names):
        return None
    return names


def enable_activation_checkpointing(model) -> None:
    """Recompute each block's activations during backward instead of keeping them."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(model).__name__} does not support activation checkpointing; set "
                         f"train.activation_checkpointing=false")
    # non-reentrant: works with frozen inputs (LoRA), DDP and FSDP without extra hooks
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def label_names_of(model) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def _numel(p) -> int:
    # a 4-bit weight packs several values per stored element: count the values it stands for
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def param_counts(model) -> dict:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "trainable_params": trainable,
            "trainable_share": trainable / total if total else 0.0}
