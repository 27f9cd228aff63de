"""Examples -> token ids (cut to max_length, in a memory-mapped token store on disk) -> length-grouped,
rank-sharded, padded batches, built ahead of the step on a background thread."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import paths
from engine.columns import chunks
from engine.errors import DataError
from engine.sources import Examples

# Tokenization, cached


class TokenRows(Sequence):
    """Every example's token ids as slices of one flat array (a token store's memory map)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self):
        for i in range(len(self)):
            yield self.flat[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Tokenized:
    ids: Sequence[np.ndarray]  # one integer array per example, unpadded (TokenRows from the store)
    labels: np.ndarray

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        if isinstance(self.ids, TokenRows):
            return self.ids.lengths
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def default_cache_dir() -> Path:
    return paths.user_cache_dir() / "tokens"


def tokenize(examples: Examples, tokenizer, max_length: int, cache_dir: str | None = None,
             truncation: str = "head", head_tokens: int = 0) -> Tokenized:
    """Token ids for every text, cut to max_length (see DataConfig.truncation), in an on-disk token
    store keyed by the tokenizer, the cut and the texts: built once per node (the first process to
    take the store's lock builds it, the others wait on the lock, then map it) and reused after.

    A pre-tokenized source's ids go into the store as they are, checked against max_length."""
    key = _store_key(examples, tokenizer, max_length, truncation, head_tokens)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    store = folder / key
    rows = store_rows(store)
    if rows is None:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(store):  # a file lock, not a collective: no process-group timeout applies to the wait
            rows = store_rows(store)
            if rows is None:
                dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
                chunks = _encoded_chunks(examples, tokenizer, max_length, truncation, head_tokens)
                write_store(store, chunks, dtype, len(tokenizer))
                rows = store_rows(store)
    return Tokenized(rows, examples.labels)


def _store_key(examples: Examples, tokenizer, max_length: int, truncation: str, head_tokens: int) -> str:
    digest = hashlib.sha256()
    if examples.pretokenized:  # no tokenizer call: its ids and the length limit alone decide the store
        digest.update(f"pretokenized|{max_length}".encode())
        for part in chunks(examples.texts):
            for ids in part:
                digest.update(np.asarray(ids, dtype=np.int64).tobytes())
                digest.update(b"\0")
    else:
        digest.update(_tokenizer_fingerprint(tokenizer).encode())
        digest.update(f"{max_length}|{truncation}|{head_tokens if truncation == 'head_tail' else 0}".encode())
        for part in chunks(examples.texts):
            for text in part:
                digest.update(text.encode("utf-8", "surrogatepass"))
                digest.update(b"\0")
    return f"{digest.hexdigest()[:32]}.v{STORE_FORMAT}"


# The token store: <key>.ids (every example's ids, end to end), <key>.offsets.npy (n + 1 int64)
# and <key>.json (dtype, counts, the offsets' checksum). The header is written last: a store
# without a header that matches both files was cut short or damaged, and is built again.

STORE_FORMAT = 1
ENCODE_ROWS = 1_000  # texts per call into the Rust tokenizer (its threads share each call)


def store_rows(store: Path) -> TokenRows | None:
    """The store's rows, memory-mapped, or None when any part is missing or does not match its header."""
    try:
        header = json.loads(store.with_suffix(store.suffix + ".json").read_text(encoding="utf-8"))
        if header.get("format") != STORE_FORMAT:
            return None
        offsets = np.load(store.with_suffix(store.suffix + ".offsets.npy"), allow_pickle=False)
        dtype = np.dtype(header["dtype"])
        ids_file = store.with_suffix(store.suffix + ".ids")
        ok = (offsets.dtype == np.int64 and len(offsets) == header["rows"] + 1 and offsets[0] == 0
              and int(offsets[-1]) == header["tokens"] and bool(np.all(np.diff(offsets) >= 0))
              and hashlib.sha256(offsets.tobytes()).hexdigest() == header["offsets_sha256"]
              and ids_file.stat().st_size == header["tokens"] * dtype.itemsize)
        if not ok:
            return None
        flat = np.memmap(ids_file, dtype=dtype, mode="r") if header["tokens"] else np.zeros(0, dtype)
        return TokenRows(flat, offsets)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_store(store: Path, encoded: Iterator[list], dtype, vocab_size: int) -> None:
    """Write the chunks of token-id lists to temporary files, fsync, rename; the header last."""
    header_file = store.with_suffix(store.suffix + ".json")
    header_file.unlink(missing_ok=True)  # a store being rebuilt is not trusted meanwhile
    ids_file, offsets_file = store.with_suffix(store.suffix + ".ids"), store.with_suffix(store.suffix + ".offsets.npy")
    # random temporary names: a pid in them would repeat on another host sharing the cache
    ids_tmp, offsets_tmp = (p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp") for p in (ids_file, offsets_file))
    lengths = []
    try:
        with open(ids_tmp, "xb") as f:
            for chunk in encoded:
                n = np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk))
                flat = np.fromiter(itertools.chain.from_iterable(chunk), dtype=np.int64, count=int(n.sum()))
                if len(flat) and flat.max() >= vocab_size:
                    raise DataError(f"token id {int(flat.max())} is outside the tokenizer's vocabulary "
                                    f"({vocab_size} ids)")
                f.write(flat.astype(dtype).tobytes())
                lengths.append(n)
            f.flush()
            os.fsync(f.fileno())
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths) if lengths else [])]).astype(np.int64)
        with open(offsets_tmp, "xb") as f:
            np.save(f, offsets, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(ids_tmp, ids_file)
        os.replace(offsets_tmp, offsets_file)
        header = {"format": STORE_FORMAT, "dtype": np.dtype(dtype).name, "rows": len(offsets) - 1,
                  "tokens": int(offsets[-1]), "offsets_sha256": hashlib.sha256(offsets.tobytes()).hexdigest()}
        paths.write_json_atomic(header_file, header)
    finally:
        ids_tmp.unlink(missing_ok=True)
        offsets_tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(store: Path):
    """Hold an exclusive lock on the store (released by the kernel if the holder dies)."""
    with open(store.with_suffix(store.suffix + ".lock"), "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _encoded_chunks(examples: Examples, tokenizer, max_length: int, truncation: str,
                    head_tokens: int) -> Iterator[list]:
    """Token-id lists, ENCODE_ROWS texts at a time, in order."""
    if examples.pretokenized:
        yield from _checked_ids(examples, max_length)
        return
    if truncation != "head":
        budget, keep_head, prefix, suffix = _cut_plan(tokenizer, max_length, truncation, head_tokens)
    encode = _fast_encoder(tokenizer, max_length if truncation == "head" else None)
    for texts in chunks(examples.texts, ENCODE_ROWS):
        if encode is not None:
            enc = encode(texts)
        elif truncation == "head":
            enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
        else:
            # verbose=False: texts longer than the model are expected here, they are cut below
            enc = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        if truncation != "head":
            enc = [prefix + _cut(body, budget, keep_head) + suffix for body in enc]
        yield enc


def _checked_ids(examples: Examples, max_length: int) -> Iterator[list]:
    position = 0
    for part in chunks(examples.texts, ENCODE_ROWS):
        for j, ids in enumerate(part):
            if len(ids) > max_length:
                row = examples.rows[position + j] if examples.rows is not None else position + j + 1
                raise DataError(f"{examples.origin}: row {row}, column 'input_ids': {len(ids)} token ids, "
                                f"more than data.max_length={max_length} (cut them when writing the file, "
                                f"special tokens included, or raise data.max_length)")
        position += len(part)
        yield part


def _fast_encoder(tokenizer, max_length: int | None):
    """A call straight into a copy of the Rust tokenizer (its `encode_batch` runs on all cores):
    token ids only, without the Python lists of masks and type ids the transformers call builds.
    None when the tokenizer has no Rust backend; `max_length` None: no special tokens, no cut
    (the bodies head_tail cuts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(backend.to_str())
    fast.no_padding()
    if max_length is None:
        fast.no_truncation()
    else:
        fast.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads
    batch_encode = getattr(fast, "encode_batch_fast", fast.encode_batch)

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in batch_encode(texts, add_special_tokens=max_length is not None)]

    # the transformers call is the reference: a tokenizer whose call does more than its backend
    # (a chat or marked-text path) is tokenized through that call
    probe = ["a b c", "Hello, World! \u00e9t\u00e9 <br /> 12"]
    if max_length is None:
        ref = tokenizer(probe, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    else:
        ref = tokenizer(probe, truncation=True, max_length=max_length, padding=False)["input_ids"]
    return encode if [list(x) for x in ref] == encode(probe) else None


def _cut_plan(tokenizer, max_length: int, truncation: str, head_tokens: int):
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
    return budget, keep_head, prefix, suffix


def _cut(body: list[int], budget: int, keep_head: int) -> list[int]:
    if len(body) > budget:
        return body[:keep_head] + body[len(body) - (budget - keep_head):]
    return list(body)


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


def pad_width(longest: int, multiple_of: int = 8, buckets: Sequence[int] | None = None) -> int:
    """A batch's padded length: the smallest of data.pad_buckets that holds its longest row (a bounded
    set of shapes for a compiled model), else that row's length rounded up to `multiple_of`."""
    if not buckets:
        return -(-longest // multiple_of) * multiple_of
    if longest > buckets[-1]:  # the recipe's check makes the last bucket max_length, which holds any row
        raise DataError(f"a batch of {longest} tokens is longer than the last of data.pad_buckets {list(buckets)}")
    return int(buckets[np.searchsorted(buckets, longest)])


def collate(data: Tokenized, idx: np.ndarray, pad_id: int, pad_left: bool = False,
            multiple_of: int = 8, buckets: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Pad one batch to its own longest sequence (see pad_width)."""
    seqs = [data.ids[i] for i in idx]
    width = pad_width(max(len(s) for s in seqs), multiple_of, buckets)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        if pad_left:
            input_ids[row, width - len(s):], mask[row, width - len(s):] = s, 1
        else:
            input_ids[row, :len(s)], mask[row, :len(s)] = s, 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
             "labels": torch.from_numpy(data.labels[idx])}
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
