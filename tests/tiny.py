"""Tiny models and data built on the spot: no downloads, seconds to train.

`make_model(folder, arch)` writes a randomly initialised classifier of a real architecture with a
word-level tokenizer; `make_data(folder)` writes a small sentiment set whose words carry the label.
"""
from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

POSITIVE = "good great wonderful superb loved delightful brilliant enjoyable fine excellent".split()
NEGATIVE = "bad awful terrible boring hated dreadful poor dull weak horrible".split()
FILLER = "the movie film plot actor scene story was it a this and very quite really".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

ARCH = {
    "bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=128),
    "distilbert": dict(model_type="distilbert", dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                       max_position_embeddings=128),
    "roberta": dict(model_type="roberta", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=130),
}
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=130)
ARCH.update({
    "xlm-roberta": dict(model_type="xlm-roberta", **ENCODER),
    "electra": dict(model_type="electra", embedding_size=32, **ENCODER),
    # ALBERT: one layer shared across the depth; factorised embeddings as wide as the body here
    "albert": dict(model_type="albert", embedding_size=32, **ENCODER),
    "mpnet": dict(model_type="mpnet", **ENCODER),
    # shaped like DeBERTa-v3: relative positions (both attention terms), no absolute positions
    "deberta-v2": dict(model_type="deberta-v2", relative_attention=True, pos_att_type=["p2c", "c2p"],
                       position_biased_input=False, position_buckets=16, max_relative_positions=-1,
                       share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=0, **ENCODER),
    "modernbert": dict(model_type="modernbert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=128, global_attn_every_n_layers=2,
                       local_attention=16),
})
# Funnel nests its layers in a list of lists (encoder.blocks[i][j]), one inner list per pooling block
ARCH["funnel"] = dict(model_type="funnel", block_sizes=[1, 1, 1], d_model=32, n_head=2, d_head=16, d_inner=64,
                      num_decoder_layers=1, max_position_embeddings=128)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=128)
ARCH.update({
    "llama": dict(model_type="llama", **DECODER),
    "qwen2": dict(model_type="qwen2", **DECODER),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=16, **DECODER),
    "mistral": dict(model_type="mistral", sliding_window=16, **DECODER),
    "phi3": dict(model_type="phi3", **DECODER),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_inner=64, n_layer=2, n_head=2, n_positions=128),
})
DECODERS = ("llama", "qwen2", "gemma3", "mistral", "phi3", "gpt2")
# the families of the matrix in tests/test_families.py: every kind people fine-tune for sentiment
FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "deberta-v2", "electra", "albert", "mpnet",
            "modernbert", *DECODERS)
NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
    "distilbert": dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0),
    "roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
    "xlm-roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
    "electra": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
    "albert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0),
    "mpnet": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "deberta-v2": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0),
    "modernbert": dict(attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0, classifier_dropout=0.0),
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0),
    "funnel": dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
}


def make_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(POSITIVE + NEGATIVE + FILLER)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer: transformers rebuilds Qwen2's tokenizer from vocab and merges,
    which a word-level one does not survive."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    words = POSITIVE + NEGATIVE + FILLER
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(words)] * 10 + words, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<|endoftext|>")


# the width keys of each architecture: (hidden, feed-forward)
WIDTH_KEYS = {"bert": ("hidden_size", "intermediate_size"), "distilbert": ("dim", "hidden_dim"),
              "roberta": ("hidden_size", "intermediate_size"),
              **{a: ("hidden_size", "intermediate_size") for a in FAMILIES if a not in ("distilbert", "gpt2")},
              "gpt2": ("n_embd", "n_inner")}
# keys that must follow the width: (key, width -> value)
WIDTH_FOLLOWERS = {"embedding_size": lambda h: h, "head_dim": lambda h: h // 2}


def make_model(folder, arch: str = "bert", num_labels: int = 2, dropout: bool = False, seed: int = 0,
               id2label: dict | None = None, hidden: int | None = None, vocab_size: int | None = None,
               init_range: float | None = None) -> str:
    """`hidden` widens the model (feed-forward 2x; bitsandbytes' 4-bit CPU kernels need widths that
    are multiples of 64); `vocab_size` adds embedding rows no token uses, so the body outweighs the
    head and adapters as in a real model; `init_range` (std of the random weights, transformers'
    default 0.02) above ~0.1 gives a frozen random body attention that mixes the words, so that
    adapters alone can learn the task."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = make_bpe_tokenizer() if arch == "qwen2" else make_tokenizer()
    spec = dict(ARCH[arch])
    if hidden:
        spec.update(zip(WIDTH_KEYS[arch], (hidden, 2 * hidden), strict=True))
        spec.update({k: f(hidden) for k, f in WIDTH_FOLLOWERS.items() if k in spec})
    kw = dict(NO_DROPOUT.get(arch, {})) if not dropout else {}  # a copy: the updates below must not leak
    if init_range:
        kw["initializer_range"] = init_range
    if id2label:
        kw.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    # special tokens the tokenizer has (config defaults name ids outside the tiny vocabulary)
    ends = {"bos_token_id": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.eos_token_id,
            "eos_token_id": tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
            "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    kw.update({k: v for k, v in ends.items() if v is not None})
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=max(vocab_size or 0, len(tokenizer)),
                                  num_labels=num_labels,
                                  pad_token_id=tokenizer.pad_token_id, **spec, **kw)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sentence(rng: random.Random, label: int) -> str:
    words = POSITIVE if label == 1 else NEGATIVE
    body = [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
    body += [rng.choice(words) for _ in range(rng.randint(1, 3))]
    rng.shuffle(body)
    return " ".join(body)


def make_data(folder, n_train: int = 64, n_test: int = 33, seed: int = 0, fmt: str = "parquet") -> str:
    """A folder with train/test splits in `fmt` (parquet, csv, tsv, jsonl); labels 0 neg, 1 pos."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 2 for i in range(n)]
        frame = pd.DataFrame({"text": [sentence(rng, y) for y in labels], "label": labels})
        path = folder / f"{split}.{fmt}"
        if fmt == "parquet":
            frame.to_parquet(path)
        elif fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "tsv":
            frame.to_csv(path, index=False, sep="\t")
        else:
            frame.to_json(path, orient="records", lines=True)
    return str(folder)


def _llama_cpp_permute(w, n_head: int):
    """The row order llama.cpp's converter gives Q and K (rotary halves interleaved per head), which
    transformers' GGUF loader undoes; written the converter's way so the test checks the loader's."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf(folder, name: str = "tiny-llama-q8_0.gguf", seed: int = 0) -> tuple[str, str, dict]:
    """A tiny Llama as llama.cpp writes one: metadata under llama.cpp's keys, tensors under its
    names, Q and K permuted, linear weights quantised to Q8_0, a byte-level BPE (`gpt2`) tokenizer.

    Returns (folder, file name, weights): `weights` maps transformers' parameter names to what a
    correct loader must produce, i.e. the written values after the Q8_0 round trip, un-permuted.
    """
    import json

    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize, quantize
    from transformers import LlamaConfig, LlamaModel

    tokenizer = make_bpe_tokenizer()
    spec = dict(ARCH["llama"])
    spec.pop("model_type")
    n_head, n_kv = spec["num_attention_heads"], spec["num_key_value_heads"]
    head_dim = spec["hidden_size"] // n_head
    torch.manual_seed(seed)
    body = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), rms_norm_eps=1e-6, **spec))

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(folder / name, "llama")
    writer.add_name("tiny llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(spec["max_position_embeddings"])
    writer.add_embedding_length(spec["hidden_size"])
    writer.add_block_count(spec["num_hidden_layers"])
    writer.add_feed_forward_length(spec["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokenizer))

    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, spec["num_hidden_layers"])
    expected = {}
    for hf_name, tensor in body.state_dict().items():
        if "rotary_emb" in hf_name:
            continue
        module, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(f"model.{module}") + "." + suffix
        w = tensor.float().numpy()
        if w.ndim == 1:  # llama.cpp keeps norms in F32
            writer.add_tensor(gguf_name, w)
            expected[f"model.{hf_name}"] = w
            continue
        heads = n_head if ".q_proj" in hf_name else n_kv if ".k_proj" in hf_name else None
        stored = quantize(_llama_cpp_permute(w, heads) if heads else w, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(gguf_name, stored, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        # Q8_0 blocks run along rows, so quantising commutes with the row permutation
        expected[f"model.{hf_name}"] = dequantize(quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                                  gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(folder), name, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expected.items()}
