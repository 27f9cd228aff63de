"""Examples -> token ids (cut to max_length, cached on disk) -> length-grouped, rank-sharded,
padded batches, built ahead of the step on a background thread."""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import paths
from engine.errors import DataError
from engine.sources import Examples

# --------------------------------------------------------------------------------------------
# Tokenization, cached


@dataclass
class Tokenized:
    ids: list[np.ndarray]  # one int32 array per example, unpadded
    labels: np.ndarray

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def default_cache_dir() -> Path:
    return paths.user_cache_dir() / "tokens"


def tokenize(examples: Examples, tokenizer, max_length: int, cache_dir: str | None = None,
             truncation: str = "head", head_tokens: int = 0) -> Tokenized:
    """Token ids for every text, cut to max_length (see DataConfig.truncation); read from the cache
    when seen before."""
    digest = hashlib.sha256()
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    digest.update(f"{max_length}|{truncation}|{head_tokens if truncation == 'head_tail' else 0}".encode())
    for text in examples.texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    file = folder / f"{digest.hexdigest()[:32]}.npz"
    if file.exists():
        try:
            with np.load(file) as z:
                flat, offsets = z["ids"], z["offsets"]
            return Tokenized(np.split(flat, offsets[1:-1]), examples.labels)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    if truncation == "head":
        enc = tokenizer(examples.texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    else:
        enc = _cut_from_both_ends(examples.texts, tokenizer, max_length, truncation, head_tokens)
    ids = [np.asarray(x, dtype=np.int32) for x in enc]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
    folder.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=np.concatenate(ids) if ids else np.zeros(0, np.int32), offsets=offsets)
    os.replace(tmp, file)
    return Tokenized(ids, examples.labels)


def _cut_from_both_ends(texts: list[str], tokenizer, max_length: int, truncation: str,
                        head_tokens: int) -> list[list[int]]:
    """tail: the last tokens of each text; head_tail: its first head_tokens and its last ones;
    max_length in all, the tokenizer's own special tokens included."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    keep_head = head_tokens if truncation == "head_tail" else 0
    if keep_head < 0:  # launch/evaluate.py builds its DataConfig without the recipe's checks
        raise DataError(f"data.head_tokens must be >= 0, got {head_tokens}")
    if budget - keep_head < 1:
        raise DataError(f"data.max_length={max_length} leaves {budget} tokens after the tokenizer's "
                        f"{max_length - budget} special tokens: no room for a tail after "
                        f"data.head_tokens={keep_head}")
    prefix, suffix = special_token_layout(tokenizer)
    # verbose=False: texts longer than the model are expected here, they are cut below
    bodies = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    out = []
    for body in bodies:
        if len(body) > budget:
            body = body[:keep_head] + body[len(body) - (budget - keep_head):]
        out.append(prefix + list(body) + suffix)
    return out


def special_token_layout(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text ([CLS] / [SEP], <s> /
    </s>, a decoder's BOS, or none), read from its own output on a probe text.

    transformers 5's fast tokenizers have no build_inputs_with_special_tokens; their
    post-processor only runs inside encoding, so the layout is read from an encoded probe.
    """
    enc = tokenizer("a b c", add_special_tokens=True, return_special_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["special_tokens_mask"]
    body = [i for i, m in enumerate(mask) if not m]
    if not body:
        raise DataError(f"{type(tokenizer).__name__}: the probe text tokenizes to special tokens only")
    prefix, suffix = ids[:body[0]], ids[body[-1] + 1:]
    if len(prefix) + len(suffix) != tokenizer.num_special_tokens_to_add(pair=False) or \
            any(mask[body[0]:body[-1] + 1]):
        raise DataError(f"{type(tokenizer).__name__}: its special tokens are not a fixed prefix and "
                        f"suffix around the text; use data.truncation=head")
    return list(prefix), list(suffix)


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime settings that each call rewrites, not the vocabulary
        spec.pop("padding", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = f"{type(tokenizer).__name__}|{tokenizer.padding_side}|{tokenizer.truncation_side}"
    return hashlib.sha256((body + extra).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Batches


def train_steps(lengths: np.ndarray, batch_size: int, grad_accum: int, epoch: int, seed: int,
                world: int = 1, rank: int = 0, group_by_length: bool = True) -> list[list[np.ndarray]]:
    """This rank's micro-batches (index arrays) for every optimizer step of one epoch.

    The plan depends only on the global step size (batch_size x grad_accum x world), the seed and
    the epoch, so 1 process x batch 8 and 2 ranks x batch 4 see the same examples in each step.
    Incomplete last steps are dropped so every rank has work in every step.
    """
    step = batch_size * grad_accum * world
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    n_steps = len(order) // step
    order = order[: n_steps * step]
    if group_by_length:
        # sort inside windows of 64 steps: batches hold similar lengths, the epoch stays shuffled
        window = step * 64
        chunks = [order[i:i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order
        groups = order.reshape(n_steps, step)[rng.permutation(n_steps)]
    else:
        groups = order.reshape(n_steps, step)
    plan = []
    for group in groups:
        micro = [group[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size]
                 for m in range(grad_accum)]
        plan.append(micro)
    return plan


def eval_batches(lengths: np.ndarray, batch_size: int, world: int = 1, rank: int = 0) -> list[np.ndarray]:
    """This rank's share of the eval set, longest first (padding stays small); every index once."""
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[rank::world]


def collate(data: Tokenized, idx: np.ndarray, pad_id: int, pad_left: bool = False,
            multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Pad one batch to its own longest sequence (rounded up to `multiple_of`)."""
    seqs = [data.ids[i] for i in idx]
    longest = max(len(s) for s in seqs)
    width = -(-longest // multiple_of) * multiple_of
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        if pad_left:
            input_ids[row, width - len(s):], mask[row, width - len(s):] = s, 1
        else:
            input_ids[row, :len(s)], mask[row, :len(s)] = s, 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(data.labels[idx]),
    }
    if pad_left:  # positions count from the first real token, as they would without padding
        batch["position_ids"] = torch.from_numpy(np.clip(mask.cumsum(axis=1) - 1, 0, None))
    return batch


def model_inputs(batch: dict, device) -> dict:
    """The tensors the model's forward takes (all but labels), on `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}


def prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Build the next batches on a background thread while the current step computes."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for b in batches:
                q.put(b)
        except BaseException as e:  # surface worker errors in the training thread
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
