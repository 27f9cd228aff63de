"""One fine-tuning run, top to bottom: recipe -> data -> model -> base snapshot -> loop -> tuned.

Read this file to know what `launch/train.py` does; each line calls one component.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from engine import checkpoint, data as data_lib, distributed, loop, modeling
from engine.config import Recipe, dump_recipe, to_dict
from engine.evaluation import evaluate
from engine.precision import Precision
from engine.tracking import Tracker


class OutputDirError(ValueError):
    """The output folder already holds a finished run."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(recipe: Recipe, overwrite: bool = False) -> dict:
    started = time.perf_counter()
    out = Path(recipe.output_dir)
    if (out / "metrics.json").exists() and not overwrite:
        raise OutputDirError(f"{out}: holds a finished run (metrics.json); pick another output_dir "
                             f"or pass --overwrite")
    dist = distributed.init(recipe.distributed, recipe.train.num_threads)
    train_cfg = recipe.train
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, out / "recipe.yaml")
    precision = Precision(train_cfg.precision, dist.device)

    # data and model; the head's initialisation is seeded, and identical on every rank
    seed_everything(recipe.seed)
    splits = data_lib.load_splits(recipe.data, recipe.seed)
    tokenizer = modeling.load_tokenizer(recipe.model)
    model = modeling.load_model(recipe.model, splits.label_names, tokenizer)
    pad_id, pad_left = tokenizer.pad_token_id, tokenizer.padding_side == "left"
    train_set = data_lib.tokenize(splits.train, tokenizer, recipe.data.max_length, recipe.data.cache_dir)
    eval_set = data_lib.tokenize(splits.eval, tokenizer, recipe.data.max_length, recipe.data.cache_dir)
    check_sizes(len(train_set), len(eval_set), train_cfg, dist)

    # the base snapshot: fine-tuning overwrites the weights in place, so keep them first
    if dist.is_main:
        base_sha = checkpoint.save_snapshot(model, tokenizer, out / "base")
    counts = modeling.param_counts(model)

    model = dist.wrap(model, precision.dtype)
    if train_cfg.compile:
        model = torch.compile(model)

    def run_eval() -> dict:
        return evaluate(model, eval_set, splits.label_names, train_cfg.eval_batch_size, precision,
                        dist, pad_id, pad_left)

    base_metrics = run_eval()
    tracker_steps = loop.total_steps(len(train_set), train_cfg, dist.world)[1]
    tracker = Tracker(out, dist.is_main, tracker_steps)
    tracker.message(f"train {len(train_set)} examples from {splits.train.origin}; "
                    f"eval {len(eval_set)} from {splits.eval.origin}; {dist.world} process(es), "
                    f"{torch.get_num_threads()} thread(s) each, strategy {dist.strategy}, "
                    f"precision {train_cfg.precision}")
    tracker.message(f"base: accuracy {base_metrics['accuracy']:.4f}  f1 {base_metrics['f1']:.4f}")

    optimizer = loop.build_optimizer(model, train_cfg)  # after wrapping: FSDP swaps the parameters
    warmup = int(train_cfg.warmup_ratio * tracker_steps)
    scheduler = loop.linear_schedule(optimizer, warmup, tracker_steps)
    result = loop.train(model, optimizer, scheduler, train_set, train_cfg, precision, dist,
                        seed=recipe.seed, pad_id=pad_id, pad_left=pad_left, evaluate=run_eval,
                        tracker=tracker)

    # the tuned snapshot: the best eval state when kept, else the final weights
    chosen = result.best if train_cfg.keep_best else result.evals[-1]
    state = result.best_state if train_cfg.keep_best else dist.full_state_dict(model)
    tuned_metrics = {k: v for k, v in chosen.items() if k not in ("step", "epoch")}
    report = None
    if dist.is_main:
        tuned_sha = checkpoint.save_snapshot(dist.unwrap(model), tokenizer, out / "tuned", state_dict=state)
        report = {
            "base": {**base_metrics, "sha256": base_sha, "path": str(out / "base")},
            "tuned": {**tuned_metrics, "sha256": tuned_sha, "path": str(out / "tuned"),
                      "step": chosen["step"], "epoch": chosen["epoch"]},
            "train": {**result.throughput, "final_loss": result.final_loss, "world_size": dist.world,
                      "strategy": dist.strategy, "precision": train_cfg.precision,
                      "threads_per_process": torch.get_num_threads()},
            "params": counts,
            "evals": [{k: e[k] for k in ("step", "epoch", "accuracy", "f1", "loss", "ece")}
                      for e in result.evals],
            "data": {"train": splits.train.origin, "eval": splits.eval.origin,
                     "train_n": len(train_set), "eval_n": len(eval_set), "labels": splits.label_names},
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        tracker.hparams(_flat(to_dict(recipe)), {"accuracy": tuned_metrics["accuracy"],
                                                 "f1": tuned_metrics["f1"]})
        tracker.close()
        # written last: its presence means the run finished
        checkpoint.write_json_atomic(out / "metrics.json", report)
    dist.barrier()
    dist.close()
    return report


def check_sizes(n_train: int, n_eval: int, cfg, dist) -> None:
    step = cfg.batch_size * cfg.grad_accum * dist.world
    if n_train < step:
        raise data_lib.DataError(
            f"{n_train} training examples cannot fill one step of {step} "
            f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {dist.world} processes)")
    if n_eval < dist.world:
        raise data_lib.DataError(f"{n_eval} eval examples for {dist.world} processes: need at least one each")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summary_table(report: dict) -> str:
    rows = [("", "base", "tuned")]
    for key in ("accuracy", "f1", "loss", "ece"):
        rows.append((key, f"{report['base'][key]:.4f}", f"{report['tuned'][key]:.4f}"))
    rows.append(("n", str(report["base"]["n"]), str(report["tuned"]["n"])))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    t = report["train"]
    lines.append(f"train: {t['samples_per_s']:.1f} samples/s, {t['real_tokens_per_s']:.0f} tokens/s "
                 f"(padding {t['padding_share']:.1%}), {t['steps']} steps in {t['train_seconds']:.0f}s; "
                 f"whole run {report['wall_seconds']:.0f}s")
    return "\n".join(lines)
