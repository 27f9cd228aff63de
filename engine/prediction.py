"""Label a file of new texts with a classifier: read -> tokenize -> engine.evaluation.predict -> write.

The scoring is evaluate's own (`evaluation.predict`: length-sorted batches, sharded over ranks and
gathered back into input order), so the labels here are the ones `launch/evaluate.py` scores.
Only the reading of unlabelled texts and the writing of one row per text are this module's.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from engine import batching, distributed, modeling, sources
from engine import precision as precision_lib
from engine.config import DistributedConfig, ModelConfig
from engine.errors import DataError, ModelError, OutputDirError
from engine.evaluation import predict
from engine.metrics import softmax
from engine.paths import resolve
from engine.precision import Precision

INPUT_SUFFIXES = (".txt", *sources.TABLE_SUFFIXES)
OUTPUT_SUFFIXES = (".csv", ".jsonl")
ADAPTER_CONFIG = "adapter_config.json"


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse before any work: an output type we cannot write, or a file a user may still need."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(f"{path}: the output must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise OutputDirError(f"{path}: already exists; pass --overwrite to replace it")
    return path


def read_texts(path: str | Path, column: str = "text", encoding: str = "utf-8") -> list[str]:
    """The texts of a file, in file order: a .txt holds one per line; a table holds them in `column`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(INPUT_SUFFIXES)})")
    if suffix == ".txt":
        texts = sources.decode_file(path, encoding).splitlines()
    else:
        frame = sources.read_table(path, encoding)
        if column not in frame.columns:
            raise DataError(f"{path}: no column '{column}' (--text-column); columns: "
                            f"{', '.join(map(str, frame.columns))}")
        texts = frame[column].tolist()
        for row, text in enumerate(texts, start=1):
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row}, column '{column}': expected text, got {text!r}")
    if not texts:
        raise DataError(f"{path}: no texts")
    return texts


def load_classifier(spec: str, base: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) from a snapshot folder (tuned/, base/), a hub name, or a PEFT adapter/
    folder put on its base: `base`, else the one adapter_config.json names, else the run's base/
    beside it. The adapter is merged, so it scores as tuned/ does."""
    folder = Path(spec).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file():
        mcfg = ModelConfig(name_or_path=spec, trust_remote_code=trust_remote_code)
        tokenizer = modeling.load_tokenizer(mcfg)
        return modeling.load_model(mcfg, tokenizer=tokenizer), tokenizer
    from peft import PeftModel

    try:
        named = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / ADAPTER_CONFIG}: cannot read ({e.__class__.__name__}: {e})") from None
    # the engine names base/ as output_dir/base, relative to where training ran: try the run's folder too
    candidates = [base] if base else [c for c in (named, str(folder.parent / "base")) if c]
    where = next((c for c in candidates if _exists(c)), None) or (candidates[0] if candidates else None)
    if where is None:
        raise ModelError(f"{folder}: the adapter names no base model; pass --base")
    mcfg = ModelConfig(name_or_path=where, trust_remote_code=trust_remote_code)
    tokenizer = modeling.load_tokenizer(mcfg)
    model = modeling.load_model(mcfg, tokenizer=tokenizer)
    try:
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{folder}: cannot put the adapter on {where} "
                         f"({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None
    return model, tokenizer


def _exists(spec: str) -> bool:
    try:
        return Path(resolve(spec)).expanduser().exists()
    except FileNotFoundError:
        return False


def label_file(model_spec: str, input_path: str, output_path: str, *, base: str | None = None,
               text_column: str = "text", encoding: str = "utf-8", max_length: int = 512,
               truncation: str = "head", head_tokens: int = 128, batch_size: int = 64,
               precision: str = "auto", overwrite: bool = False, trust_remote_code: bool = False,
               num_threads: int | None = None) -> dict:
    """Write one row per input text (input order): label, its probability, every class's probability.
    Under torchrun each rank scores its share; rank 0 writes. Returns a summary (every rank)."""
    out = check_output(output_path, overwrite)
    texts = read_texts(input_path, text_column, encoding)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = distributed.init(DistributedConfig(strategy="ddp" if world > 1 else "none"), num_threads)
    try:
        say = print if dist.is_main else (lambda text: None)
        choice = precision_lib.choose(precision, dist.device, dist.broadcast_object, say, dist.is_main)
        model, tokenizer = load_classifier(model_spec, base, trust_remote_code)
        modeling.check_max_length(model, max_length, model_spec, key="--max-length")
        names = modeling.label_names_of(model)
        examples = sources.Examples(texts, np.zeros(len(texts), dtype=np.int64), str(input_path))
        tokens = batching.tokenize(examples, tokenizer, max_length, truncation=truncation, head_tokens=head_tokens)
        logits = predict(model.to(dist.device), tokens, batch_size, Precision(choice.name, dist.device), dist,
                         tokenizer.pad_token_id, tokenizer.padding_side == "left")
        probs = softmax(logits.astype(np.float64))
        if dist.is_main:
            write_predictions(out, probs, names)
        dist.barrier()
    finally:
        dist.close()
    return {"model": model_spec, "input": str(input_path), "output": str(out), "n": len(texts),
            "labels": names, "precision": choice.name, "processes": dist.world}


def write_predictions(path: Path, probs: np.ndarray, names: list[str]) -> None:
    """CSV (label, probability, prob_<class>...) or JSONL ({label, probability, probs}), written to a
    temporary file and renamed: a reader never sees half a file."""
    best = probs.argmax(axis=-1)  # as classification_metrics takes it: the same labels evaluate scores
    label = [names[i] for i in best]
    top = probs[np.arange(len(probs)), best]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            if path.suffix.lower() == ".csv":
                frame = pd.DataFrame({"label": label, "probability": top,
                                      **{f"prob_{n}": probs[:, i] for i, n in enumerate(names)}})
                frame.to_csv(fh, index=False)
            else:
                for row in range(len(probs)):
                    fh.write(json.dumps({"label": label[row], "probability": float(top[row]),
                                         "probs": {n: float(probs[row, i]) for i, n in enumerate(names)}}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
