"""The baseline: the Hugging Face Trainer as in the blog "Getting Started with Sentiment Analysis using Python".

    python benchmarks/trainer_baseline.py --settings settings.json --out DIR
    torchrun --standalone --nproc_per_node=N benchmarks/trainer_baseline.py ...   (DDP, as the Trainer does it)

benchmarks/run.py writes settings.json; this script is the blog's recipe step by step
(AutoTokenizer -> tokenize with truncation -> DataCollatorWithPadding -> AutoModelFor-
SequenceClassification -> TrainingArguments(lr, batch, epochs, weight_decay=0.01) -> Trainer.train()),
with what a benchmark needs and the blog does not do:
  - the same examples as the engine's run: the data is selected by the engine's own loader from the
    same data.* overrides (same seed, same subsets), then handed to the Trainer as a datasets.Dataset;
  - truncation at the matrix's max_length (the blog truncates at the model's maximum);
  - no checkpoint saves and no hub push (the blog's save_strategy="epoch", push_to_hub=True);
  - `tokenizer=` is `processing_class=` in transformers 5; `load_metric` is gone, so accuracy and
    F1 come from engine.metrics (the engine's own definitions: macro-F1);
  - observers that change nothing the Trainer does: a callback timing each optimizer step (evaluation
    excluded), and a wrapper around `training_step` counting each micro-batch's real and padded tokens
    (one small sum on the device per micro-batch, read back at the end).
  - a pre-tokenized source (benchmarks/gpu_material.py: splits with an `input_ids` column instead of a
    text column) is trained from its ids as stored: no tokenizer call (the tokenizer only pads), the
    rows the engine's selection picks (holdout, subsets: it works on the labels and row order alone);
  - with data.test_split, the closing evaluation scores the test split, as the engine reports it;
  - method lora: peft's get_peft_model with the engine's own LoraConfig (engine.adapters.lora_config:
    the same rank, targets and whole-trained head), as a Trainer user adds LoRA.
Writes DIR/bench.json: the step timeline, evaluations, parameter counts and peak CUDA memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

# a script run by path: the repository root first, so `engine` imports from it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from engine import modeling
from engine.errors import DataError
from engine.metrics import classification_metrics
from engine.paths import is_local, resolve
from engine.precision import choose
from engine.recipe_yaml import load_recipe
from engine.sources import load_splits


class Tally:
    """Each training micro-batch's examples and tokens, counted where the Trainer hands it to
    `training_step`: in training order, whichever process collated it (dataloader_num_workers), and
    never an evaluation batch. The real-token count stays on the batch's device (no sync per step)
    and is read back once, at the end."""

    def __init__(self):
        self.rows = []  # (samples, real tokens: a 0-d tensor, padded tokens)

    def wrap(self, training_step):
        def counted(model, inputs, *args, **kwargs):
            mask = inputs["attention_mask"]
            self.rows.append((int(mask.shape[0]), mask.sum(), int(mask.numel())))
            return training_step(model, inputs, *args, **kwargs)
        return counted

    def batches(self) -> list[tuple[int, int, int]]:
        """(samples, real tokens, padded tokens) per micro-batch trained."""
        if not self.rows:
            return []
        real = torch.stack([r[1].to("cpu") for r in self.rows]).tolist()
        return [(n, int(t), padded) for (n, _, padded), t in zip(self.rows, real, strict=True)]


def load_examples(s: dict, work: Path):
    """The engine's selection of the same examples (same data.* overrides, seed and subsets), its
    classes named as the engine names them: the recipe, the source, else the model's config; and for
    a pre-tokenized source, {"train"|"eval"|"test": each selected example's stored ids} (else None)."""
    recipe = load_recipe(None, s["data_overrides"])
    model_cfg = dataclasses.replace(recipe.model, name_or_path=s["model"])
    names = lambda: modeling.config_label_names(model_cfg)  # noqa: E731
    stored = pretokenized(recipe.data)
    if stored is None:
        return load_splits(recipe.data, recipe.seed, names), None
    # the engine's selection over stand-in texts that name each row: the same rows, no copy of its rules
    keys = work / "row-keys"
    keys.mkdir(parents=True, exist_ok=True)
    ids = {}
    for split, table in stored.items():
        ids[split] = table.column(IDS).to_pylist()
        frame = table.drop_columns([IDS]).to_pandas()
        frame[recipe.data.text_column] = [str(i) for i in range(len(frame))]
        frame.to_parquet(keys / f"{split}.parquet")
    cfg = recipe.data
    splits = load_splits(dataclasses.replace(cfg, source=str(keys)), recipe.seed, names)
    eval_split = cfg.train_split if cfg.holdout_size else cfg.eval_split
    chosen = {"train": ids[cfg.train_split], "eval": ids[eval_split], "test": ids.get(cfg.test_split)}
    out = {}
    for part, table_ids in chosen.items():
        examples = getattr(splits, part)
        if examples is not None:
            out[part] = [table_ids[int(k)] for k in examples.texts]
            examples.origin = examples.origin.replace(str(keys), str(resolve(cfg.source)))
    longest = max(len(x) for x in out["train"] + out["eval"])
    if longest > s["max_length"]:
        raise DataError(f"{cfg.source}: stored ids run to {longest} tokens, over max_length {s['max_length']}; "
                        f"write the material at this length (benchmarks/gpu_material.py)")
    return splits, out


IDS = "input_ids"


def pretokenized(cfg) -> dict | None:
    """{split: pyarrow table} of a local folder whose parquet splits hold token ids, else None."""
    import pyarrow.parquet as pq

    if not is_local(cfg.source):
        return None
    folder = Path(resolve(cfg.source))
    first = folder / f"{cfg.train_split}.parquet"
    if not (first.is_file() and IDS in pq.read_schema(first).names):
        return None
    splits = {cfg.train_split, cfg.test_split, None if cfg.holdout_size else cfg.eval_split} - {None}
    tables = {}
    for split in splits:
        path = folder / f"{split}.parquet"
        if not path.is_file():
            raise DataError(f"{folder}: no {split}.parquet beside {first.name} (a pre-tokenized source)")
        tables[split] = pq.read_table(path)
        if IDS not in tables[split].column_names:
            raise DataError(f"{path}: no '{IDS}' column, as {first.name} has (a pre-tokenized source)")
    return tables


def training_arguments(s: dict, out: Path) -> dict:
    """The blog's TrainingArguments, with the Trainer's own levers as a user of it would turn them on."""
    per_device = s["batch_size"] // s["nproc"]
    kwargs = dict(output_dir=str(out / "trainer"), learning_rate=s["lr"], per_device_train_batch_size=per_device,
                  per_device_eval_batch_size=per_device, weight_decay=0.01, save_strategy="no",
                  gradient_accumulation_steps=s["grad_accum"], seed=s["seed"])
    if s["steps"]:
        kwargs["max_steps"] = s["steps"]
    else:
        kwargs["num_train_epochs"] = s["epochs"]
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # else bf16=True stops with "Your setup doesn't support bf16/gpu"
    if s["precision"] == "bf16":
        kwargs["bf16"] = True
    elif s["precision"] == "fp16":
        kwargs["fp16"] = True
    if s["group_by_length"]:
        kwargs["train_sampling_strategy"] = "group_by_length"  # transformers 5: was group_by_length=True
    if s["compile"]:
        kwargs["torch_compile"] = True
    if s["eval_every"] and s["epochs"]:
        kwargs.update(eval_strategy="steps", eval_steps=s["eval_every"])
    kwargs.update(s.get("trainer_args") or {})
    return kwargs


def tokenized_datasets(s: dict, splits, ids: dict | None, tokenizer) -> dict:
    """{"train"|"eval"|"test": a datasets.Dataset of token ids and labels}: the blog's map of the
    tokenizer over the texts, or the pre-tokenized source's ids as they are."""
    out = {}
    for part in ("train", "eval", "test"):
        examples = getattr(splits, part)
        if examples is None:
            continue
        if ids is not None:
            out[part] = Dataset.from_dict({"input_ids": ids[part], "label": examples.labels.tolist()})
            continue
        ds = Dataset.from_dict({"text": list(examples.texts), "label": examples.labels.tolist()})

        def preprocess_function(examples):
            return tokenizer(examples["text"], truncation=True, max_length=s["max_length"])

        out[part] = ds.map(preprocess_function, batched=True)
    return out


def blog_trainer(s: dict, splits, ids: dict | None, kwargs: dict, clock: StepClock, tally: Tally) -> Trainer:
    """The blog's recipe: tokenizer, tokenized datasets, padding collator, model, metrics, Trainer;
    evaluation taken off the clock, training micro-batches tallied."""
    label_names = splits.label_names
    model_path = resolve(s["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = tokenized_datasets(s, splits, ids, tokenizer)
    tokenized_train, tokenized_test = data["train"], data["eval"]
    trainer_test = data.get("test")
    data_collator = DataCollatorWithPadding(tokenizer=tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(label_names))
    if s.get("method", "full") == "lora":
        from peft import get_peft_model

        from engine.adapters import lora_config

        model = get_peft_model(model, lora_config(model, load_recipe(None, s.get("peft_overrides") or [])))

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        m = classification_metrics(np.asarray(logits), np.asarray(labels), label_names)
        return {"accuracy": m["accuracy"], "f1": m["f1"]}

    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=tokenized_train,
                      eval_dataset=tokenized_test, processing_class=tokenizer, data_collator=data_collator,
                      compute_metrics=compute_metrics, callbacks=[clock.callback(TrainerCallback)])
    trainer.training_step = tally.wrap(trainer.training_step)
    evaluate = trainer.evaluate

    def timed_evaluate(*a, **kw):  # evaluation is not training: its time leaves the clock
        started = time.perf_counter()
        try:
            return evaluate(*a, **kw)
        finally:
            clock.excluded += time.perf_counter() - started

    trainer.evaluate = timed_evaluate
    trainer.test_dataset = trainer_test
    return trainer


def all_ranks(batches: list, world: int) -> tuple[np.ndarray, np.ndarray]:
    """(this rank's tally of samples, real and padded tokens, the sum over ranks)."""
    mine = np.array([sum(b[i] for b in batches) for i in range(3)], dtype=np.float64)
    total = mine.copy()
    if world > 1 and torch.distributed.is_initialized():
        t = torch.tensor(mine)
        torch.distributed.all_reduce(t)
        total = t.numpy()
    return mine, total


def cuda_peak_bytes(world: int) -> int | None:
    """Peak CUDA memory of the largest rank, or None on CPU."""
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    if world > 1 and torch.distributed.is_initialized() and peak is not None:
        p = torch.tensor([float(peak)], device="cuda")
        torch.distributed.all_reduce(p, op=torch.distributed.ReduceOp.MAX)
        peak = int(p.item())
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    s = json.loads(Path(args.settings).read_text())
    out = Path(args.out)

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # precision auto: what the engine would pick on this machine (each rank reads the probe cache;
    # no process group exists yet to hand rank 0's answer over)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    chosen = choose(s["precision"], device, say=print if rank == 0 else (lambda text: None))
    s["precision"] = chosen.name
    splits, ids = load_examples(s, out)
    kwargs = training_arguments(s, out)
    tally = Tally()
    clock = StepClock(tally)
    trainer = blog_trainer(s, splits, ids, kwargs, clock, tally)
    trainer.train()

    final, scored, prefix = None, trainer.eval_dataset, "eval"
    if s["epochs"]:  # trained to the end: the blog's trainer.evaluate(), on the test split where there is one
        if trainer.test_dataset is not None:  # its own prefix: not a point of the dev curve
            scored, prefix = trainer.test_dataset, "test"
        final = trainer.evaluate(eval_dataset=scored, metric_key_prefix=prefix)
    batches = tally.batches()
    timeline = clock.timeline(batches, world)
    # each rank counted its own batches: scale rank 0's tally to the sum over ranks
    mine, total = all_ranks(batches, world)
    cuda_peak = cuda_peak_bytes(world)
    if rank == 0:
        model = trainer.model
        report = {
            "timeline": timeline, "world": world,
            "token_factor": [float(total[i] / (mine[i] * world)) if mine[i] else 1.0 for i in (1, 2)],
            "evals": clock.evals,
            "final": {k: final.get(f"{prefix}_{k}") for k in ("accuracy", "f1", "loss")} if final else None,
            "params": {"total_params": sum(p.numel() for p in model.parameters()),
                       "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "cuda_peak_bytes": cuda_peak, "threads": torch.get_num_threads(),
            "train_n": len(trainer.train_dataset), "eval_n": len(scored),
            "final_split": prefix, "pretokenized": ids is not None,
            "micro_batches": len(batches), **chosen.as_dict(),
            "training_args": {k: v for k, v in kwargs.items() if k != "output_dir"},
        }
        tmp = out / "bench.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out / "bench.json")
        print(f"trainer: {clock.steps[-1][0] if clock.steps else 0} steps; final {report['final']}")
    return 0


class StepClock:
    """Training-time clock at each optimizer step's end, evaluation time taken out, with the number of
    micro-batches trained by then (an epoch's last step may accumulate fewer than grad_accum)."""

    def __init__(self, tally: Tally):
        self.tally = tally
        self.start = None
        self.excluded = 0.0
        self.steps = []  # (global step, training seconds, micro-batches trained)
        self.evals = []  # {"step", "t", "accuracy", "f1"}

    def now(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def callback(self, base):
        clock = self

        class Clock(base):
            def on_train_begin(self, args, state, control, **kw):
                clock.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.steps.append((state.global_step, clock.now(), len(clock.tally.rows)))

            def on_evaluate(self, args, state, control, metrics=None, **kw):
                if clock.start is not None and metrics:
                    # evals run right after a step's end: its clock reading is theirs
                    t = clock.steps[-1][1] if clock.steps else 0.0
                    clock.evals.append({"step": state.global_step, "t": t,
                                        "accuracy": metrics.get("eval_accuracy"), "f1": metrics.get("eval_f1")})
        return Clock()

    def timeline(self, batches: list, world: int) -> list:
        """[step, seconds, samples, real tokens, padded tokens] cumulative, the whole job's (x world)."""
        rows = [[0, 0.0, 0, 0, 0]]
        for step, t, trained in self.steps:
            taken = batches[:trained]
            rows.append([step, t] + [sum(b[i] for b in taken) * world for i in range(3)])
        return rows


if __name__ == "__main__":
    sys.exit(main())
