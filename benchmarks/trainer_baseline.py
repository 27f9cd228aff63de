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
from engine.config import load_recipe
from engine.metrics import classification_metrics
from engine.paths import resolve
from engine.precision import choose
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


def load_examples(s: dict):
    """The engine's selection of the same examples (same data.* overrides, seed and subsets), its
    classes named as the engine names them: the recipe, the source, else the model's config."""
    recipe = load_recipe(None, s["data_overrides"])
    model_cfg = dataclasses.replace(recipe.model, name_or_path=s["model"])
    return load_splits(recipe.data, recipe.seed, lambda: modeling.config_label_names(model_cfg))


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


def blog_trainer(s: dict, splits, kwargs: dict, clock: StepClock, tally: Tally) -> Trainer:
    """The blog's recipe: tokenizer, tokenized datasets, padding collator, model, metrics, Trainer;
    evaluation taken off the clock, training micro-batches tallied."""
    label_names = splits.label_names
    model_path = resolve(s["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = Dataset.from_dict({"text": list(splits.train.texts), "label": splits.train.labels.tolist()})
    test = Dataset.from_dict({"text": list(splits.eval.texts), "label": splits.eval.labels.tolist()})

    def preprocess_function(examples):
        return tokenizer(examples["text"], truncation=True, max_length=s["max_length"])

    tokenized_train = train.map(preprocess_function, batched=True)
    tokenized_test = test.map(preprocess_function, batched=True)
    data_collator = DataCollatorWithPadding(tokenizer=tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(label_names))

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
    splits = load_examples(s)
    kwargs = training_arguments(s, out)
    tally = Tally()
    clock = StepClock(tally)
    trainer = blog_trainer(s, splits, kwargs, clock, tally)
    trainer.train()

    final = None
    if s["epochs"]:  # trained to the end: the blog's trainer.evaluate()
        final = trainer.evaluate()
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
            "final": {k: final.get(f"eval_{k}") for k in ("accuracy", "f1", "loss")} if final else None,
            "params": {"total_params": sum(p.numel() for p in model.parameters()),
                       "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "cuda_peak_bytes": cuda_peak, "threads": torch.get_num_threads(),
            "train_n": len(trainer.train_dataset), "eval_n": len(trainer.eval_dataset),
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
