"""Run a model over a tokenized dataset -> logits -> metrics. Shared by train, evaluate and compare.

Under several ranks each rank scores its share of the batches and the logits are gathered back
into dataset order, so every example counts exactly once whatever the world size.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.data import Tokenized, collate, eval_batches, model_inputs
from engine.metrics import classification_metrics


@torch.no_grad()
def predict(model, data: Tokenized, batch_size: int, precision, dist, pad_id: int,
            pad_left: bool = False) -> np.ndarray:
    """Logits for every example, in dataset order, on every rank."""
    was_training = model.training
    model.eval()
    # DDP's forward adds nothing at eval; FSDP's forward gathers the shards, so it must be called
    forward = dist.unwrap(model) if dist.strategy == "ddp" else model
    mine = eval_batches(data.lengths, batch_size, dist.world, dist.rank)
    total = -(-len(data) // batch_size)
    rounds = -(-total // dist.world)  # FSDP needs every rank to run the same number of forwards
    indices, chunks = [], []
    for r in range(rounds):
        idx = mine[r] if r < len(mine) else np.arange(1)  # a spare forward, thrown away
        batch = collate(data, idx, pad_id, pad_left)
        with precision.autocast():
            logits = forward(**model_inputs(batch, dist.device)).logits
        if r < len(mine):
            indices.append(idx)
            chunks.append(logits.float().cpu().numpy())
    model.train(was_training)
    n_classes = chunks[0].shape[-1] if chunks else 0
    local = (np.concatenate(indices) if indices else np.zeros(0, np.int64),
             np.concatenate(chunks) if chunks else np.zeros((0, n_classes), np.float32))
    gathered = dist.all_gather_object(local)
    n_classes = max(g[1].shape[-1] for g in gathered)
    out = np.zeros((len(data), n_classes), dtype=np.float32)
    filled = np.zeros(len(data), dtype=np.int64)
    for idx, logits in gathered:
        if len(idx):  # a rank with no batch of its own sent nothing
            out[idx] = logits
            np.add.at(filled, idx, 1)
    # a gap would score as class 0 and a double count would hide one; either is a sharding bug
    if not (filled == 1).all():
        missing, twice = int((filled == 0).sum()), int((filled > 1).sum())
        raise RuntimeError(f"evaluation sharding: {missing} of {len(data)} examples not scored, "
                           f"{twice} scored more than once")
    return out


def evaluate(model, data: Tokenized, label_names: list[str], batch_size: int, precision, dist,
             pad_id: int, pad_left: bool = False) -> dict:
    logits = predict(model, data, batch_size, precision, dist, pad_id, pad_left)
    return classification_metrics(logits, data.labels, label_names)


def evaluate_pretrained(model_path: str, data_cfg, split: str, batch_size: int = 64,
                        precision_name: str = "fp32", trust_remote_code: bool = False) -> dict:
    """Load any saved or hub classifier and evaluate it on one split, labels read from its config."""
    from engine import data as data_lib, modeling
    from engine.config import ModelConfig
    from engine.distributed import Dist
    from engine.precision import Precision

    mcfg = ModelConfig(name_or_path=model_path, trust_remote_code=trust_remote_code)
    tokenizer = modeling.load_tokenizer(mcfg)
    model = modeling.load_model(mcfg, tokenizer=tokenizer)
    names = modeling.label_names_of(model)
    examples = data_lib.load_eval_split(data_cfg, split, data_cfg.label_names or names)
    tokens = data_lib.tokenize(examples, tokenizer, data_cfg.max_length, data_cfg.cache_dir,
                               truncation=data_cfg.truncation, head_tokens=data_cfg.head_tokens)
    dist = Dist()
    metrics = evaluate(model, tokens, names, batch_size, Precision(precision_name, dist.device), dist,
                       tokenizer.pad_token_id, tokenizer.padding_side == "left")
    return {**metrics, "model": model_path, "data": examples.origin, "split": split}
