"""One fine-tuning run, top to bottom: recipe -> data -> model -> base snapshot -> loop -> tuned.

Read this file to know what `launch/train.py` does; each line calls one component.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import resource
import shutil
from pathlib import Path

import numpy as np
import torch

from engine import adapters, batching, checkpoint, distributed, loop, modeling, optim, signals, sources
from engine import precision as precision_lib
from engine.config import Recipe, dump_recipe, to_dict
from engine.errors import DataError, OutputDirError
from engine.evaluation import cached_score, eval_set_digest, evaluate
from engine.metrics import TimeParts
from engine.precision import Precision
from engine.tracking import Tracker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(recipe: Recipe, overwrite: bool = False, resume: str | None = None) -> dict:
    """Run a recipe to the end; `resume` is "auto" (latest checkpoint in output_dir) or a folder."""
    parts = TimeParts()
    out = Path(recipe.output_dir)
    dist = distributed.init(recipe.distributed, recipe.train.num_threads)
    say = print if dist.is_main else (lambda text: None)
    # one rank probes the CPU (after init: the probe runs on the threads training will use)
    choice = precision_lib.choose(recipe.train.precision, dist.device, dist.broadcast_object, say, dist.is_main)
    say(choice.describe())
    precision = Precision(choice.name, dist.device)
    resume_from = prepare_output_dir(out, overwrite, resume, dist)
    if dist.is_main:
        dump_recipe(recipe, out / "recipe.yaml")  # as asked (auto stays auto); metrics.json says what ran
    # from here on the recipe says what runs: the adapters' compute dtype reads it too
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, precision=choice.name))
    train_cfg = recipe.train

    # data and model; the head's initialisation is seeded, and identical on every rank
    seed_everything(recipe.seed)
    with parts.part("load"):
        splits = sources.load_splits(recipe.data, recipe.seed, lambda: modeling.config_label_names(recipe.model))
        tokenizer = modeling.load_tokenizer(recipe.model)
        model = modeling.load_model(recipe.model, splits.label_names, tokenizer)
    attention = modeling.attn_implementation(model)
    pad_id, pad_left = tokenizer.pad_token_id, tokenizer.padding_side == "left"
    d = recipe.data
    cut = dict(truncation=d.truncation, head_tokens=d.head_tokens)
    with parts.part("tokenize"):
        train_set = batching.tokenize(splits.train, tokenizer, d.max_length, d.cache_dir, **cut)
        eval_set = batching.tokenize(splits.eval, tokenizer, d.max_length, d.cache_dir, **cut)
        test_set = batching.tokenize(splits.test, tokenizer, d.max_length, d.cache_dir, **cut) if splits.test else None
    check_sizes(len(train_set), len(eval_set), train_cfg, dist)
    fingerprint = run_fingerprint(recipe, model, len(train_set), len(eval_set), dist)
    saved = checkpoint.read_state(resume_from) if resume_from else None
    if saved:
        check_fingerprint(resume_from, saved["fingerprint"], fingerprint)

    # the base snapshot: fine-tuning overwrites the weights in place, so keep them first
    base_sha = None
    if dist.is_main and not saved:
        with parts.part("save"):
            base_sha = checkpoint.save_snapshot(model, tokenizer, out / "base")
    if train_cfg.activation_checkpointing:
        modeling.enable_activation_checkpointing(model)
    peft = recipe.peft.method
    if peft != "none":  # the adapters go on after base/ is saved: base/ stays the plain model
        with parts.part("load"):
            model = adapters.attach(model, recipe, out / "base", dist)
    counts = modeling.param_counts(model)

    model = dist.wrap(model, precision.dtype)
    if train_cfg.compile:
        model = torch.compile(model)

    def run_eval() -> dict:
        return evaluate(model, eval_set, splits.label_names, train_cfg.eval_batch_size, precision,
                        dist, pad_id, pad_left)

    def run_tuned_eval() -> dict:
        with parts.part("tuned_eval"):
            return run_eval()

    def run_eval_of(folder: Path, dataset=eval_set) -> dict:  # a saved snapshot, scored on every rank
        snapshot = modeling.load_model(dataclasses.replace(recipe.model, name_or_path=str(folder), revision=None))
        return evaluate(snapshot.to(dist.device), dataset, splits.label_names, train_cfg.eval_batch_size,
                        precision, dist, pad_id, pad_left)

    base_reused = bool(saved)
    with parts.part("base_eval"):
        if saved:
            base_metrics = saved["base_metrics"]
        else:
            key = base_score_key(recipe, base_sha, eval_set, splits.label_names, dist) if base_sha else None
            base_metrics, base_reused = cached_score(key, run_eval, dist, score_cache_dir(recipe))
    tracker_steps = loop.total_steps(len(train_set), train_cfg, dist.world)[1]
    tracker = Tracker(out, dist.is_main, tracker_steps)
    tracker.message(f"train {len(train_set)} examples from {splits.train.origin}; "
                    f"eval {len(eval_set)} from {splits.eval.origin}; "
                    + (f"test {len(test_set)} from {splits.test.origin}; " if test_set else "")
                    + f"{dist.world} process(es), "
                    f"{torch.get_num_threads()} thread(s) each, strategy {dist.strategy}, "
                    f"{choice.describe()}, attention {attention}")
    cached_note = " (reused: an earlier run scored this base on this eval set)" if base_reused and not saved else ""
    tracker.message(f"base{' (4-bit, as it trains)' if peft == 'qlora' else ''}: "
                    f"accuracy {base_metrics['accuracy']:.4f}  f1 {base_metrics['f1']:.4f}{cached_note}")
    if peft != "none":
        tracker.message(f"{peft}: {counts['trainable_params']:,} of {counts['total_params']:,} parameters "
                        f"train ({counts['trainable_share']:.2%})")

    optimizer = optim.build_optimizer(model, train_cfg)  # after wrapping: FSDP swaps the parameters
    scheduler = optim.build_schedule(optimizer, train_cfg, tracker_steps)
    state = None
    if saved:
        checkpoint.load_training_state(resume_from, model, optimizer, scheduler, precision, dist)
        state = loop.LoopState(**saved["loop"])
        tracker.message(f"resumed from {resume_from} (step {state.step}, epoch {state.epoch})")

    best_file = out / checkpoint.CHECKPOINTS / "best.safetensors"
    stop = signals.StopRequest(dist)

    def keep_best(s: loop.LoopState) -> None:
        with parts.part("save"):
            weights = dist.full_state_dict(model)
            if dist.is_main:
                checkpoint.save_weights(best_file, weights)

    def save_checkpoint(s: loop.LoopState) -> None:
        if recipe.checkpoint.keep:
            with parts.part("save"):
                checkpoint.save_training_state(
                    out, s.step, model, optimizer, scheduler, precision, dist, keep=recipe.checkpoint.keep,
                    state={"loop": dataclasses.asdict(s), "fingerprint": fingerprint, "base_metrics": base_metrics})

    hooks = loop.Hooks(evaluate=run_tuned_eval, keep_best=keep_best, checkpoint=save_checkpoint,
                       stop_requested=stop.requested)
    try:
        with stop.installed(), parts.part("train"):  # its evals and saves count as their own parts
            state, throughput = loop.train(
                model, optimizer, scheduler, train_set, train_cfg, precision, dist, seed=recipe.seed,
                pad_id=pad_id, pad_left=pad_left, hooks=hooks, tracker=tracker,
                checkpoint_every=recipe.checkpoint.every, state=state)
    except loop.StopTraining as e:
        tracker.close()
        latest = checkpoint.checkpoint_dirs(out)
        where = f"the last checkpoint is {latest[-1]}" if latest else "no checkpoint was written"
        raise loop.StopTraining(f"{e}; {where}; continue with: --resume auto") from None
    peak = peak_memory(dist.device)
    peak["peak_memory_mb"] = max(dist.all_gather_object(peak["peak_memory_mb"]))  # the largest rank

    # the tuned snapshot: the best eval state when kept, else the final weights
    chosen = state.best if train_cfg.keep_best else state.evals[-1]
    if train_cfg.keep_best:
        weights = checkpoint.load_weights(best_file) if dist.is_main else {}
    else:
        weights = dist.full_state_dict(model)
    tuned_metrics = {k: v for k, v in chosen.items() if k not in ("step", "epoch")}
    exported = None
    if dist.is_main and peft != "none":
        with parts.part("save"):
            exported = adapters.export(dist.unwrap(model), weights, out, tokenizer, recipe)
    if dist.is_main:
        if exported:
            tuned_sha = exported["tuned_sha256"]
        else:
            with parts.part("save"):
                tuned_sha = checkpoint.save_snapshot(dist.unwrap(model), tokenizer, out / "tuned", state_dict=weights)

    # What is reported is base/ and tuned/ as saved. The evals during training scored the model as it
    # trained, which is not what was saved when QLoRA trained a 4-bit copy, or when FSDP's mixed
    # precision ran forward on bf16/fp16 copies of the weights: those runs score the snapshots again
    # (fp32 weights, under the same autocast as one process). With data.test_split the snapshots are
    # scored once on test, and the eval split only selected (its figures go to `dev`).
    as_trained = {"base": base_metrics, "tuned": tuned_metrics}
    rescore = peft == "qlora" or (dist.strategy == "fsdp" and precision.dtype is not None)
    if test_set is not None or rescore:
        dist.barrier()  # tuned/ is on disk
        final_set = eval_set if test_set is None else test_set
        with parts.part("base_eval"):
            base_metrics = run_eval_of(out / "base", final_set)
        with parts.part("tuned_eval"):
            tuned_metrics = run_eval_of(out / "tuned", final_set)
    if test_set is not None:
        tracker.message(f"test: base accuracy {base_metrics['accuracy']:.4f}, tuned {tuned_metrics['accuracy']:.4f} "
                        f"(n {tuned_metrics['n']}); selected on dev: tuned {as_trained['tuned']['accuracy']:.4f}")
    report = None
    if dist.is_main:
        report = {
            "base": {**base_metrics, "sha256": checkpoint.file_sha256(out / "base" / checkpoint.WEIGHTS),
                     "path": str(out / "base"),
                     # true: this base, eval set and settings were scored by an earlier run (or the
                     # checkpoint resumed from), and that score is reused instead of scoring again
                     "score_reused": base_reused},
            "tuned": {**tuned_metrics, "sha256": tuned_sha, "path": str(out / "tuned"),
                      "step": chosen["step"], "epoch": chosen["epoch"]},
            "train": {**throughput, "final_loss": state.final_loss, "world_size": dist.world,
                      "strategy": dist.strategy, **choice.as_dict(),
                      "threads_per_process": torch.get_num_threads(), "resumed_from": str(resume_from or ""),
                      **peak},
            "params": counts,
            "model": {"name_or_path": recipe.model.name_or_path, "attn_implementation": attention},
            "evals": [{k: e[k] for k in ("step", "epoch", "accuracy", "f1", "loss", "ece")}
                      for e in state.evals],
            "data": {"train": splits.train.origin, "eval": splits.eval.origin,
                     "train_n": len(train_set), "eval_n": len(eval_set), "labels": splits.label_names},
            "wall_seconds": round(parts.wall(), 1),
            "time_parts": parts.summary(),  # seconds: load, tokenize, base_eval, train, tuned_eval, save, other
        }
        slim = {side: {k: m[k] for k in ("accuracy", "f1", "loss", "ece", "n")} for side, m in as_trained.items()}
        if test_set is not None:  # base/tuned above are the test figures; these are the selection set's
            report["dev"] = slim
            report["data"].update(test=splits.test.origin, test_n=len(test_set))
        elif rescore and peft != "qlora":  # FSDP mixed precision: the low-precision copies' figures
            report["as_trained"] = {"what": f"FSDP forward on {train_cfg.precision} copies of the weights", **slim}
        if exported:
            report["peft"] = {
                "method": peft, "r": recipe.peft.r, "alpha": recipe.peft.alpha, "dropout": recipe.peft.dropout,
                "target_modules": exported["target_modules"], "modules_to_save": exported["modules_to_save"],
                "adapter": {"path": str(out / "adapter"), "sha256": exported["adapter_sha256"]},
            }
            if peft == "qlora":  # the 4-bit model as it trained, before and after (on dev with a test split)
                report["peft"]["quantized"] = slim
        tracker.hparams(_flat(to_dict(recipe)), {"accuracy": tuned_metrics["accuracy"],
                                                 "f1": tuned_metrics["f1"]})
        tracker.close()
        # written last: its presence means the run finished
        checkpoint.write_json_atomic(out / "metrics.json", report)
    dist.barrier()
    dist.close()
    return report


def base_score_key(recipe: Recipe, base_sha: str, eval_set, label_names: list[str], dist) -> dict:
    """Everything the base model's eval score depends on; {} (never cached) for QLoRA, whose base
    is scored as the 4-bit copy it trains."""
    if recipe.peft.method == "qlora":
        return {}
    t = recipe.train
    return {"base_sha256": base_sha, "eval_set_sha256": eval_set_digest(eval_set), "labels": label_names,
            "precision": t.precision, "eval_batch_size": t.eval_batch_size, "compile": t.compile,
            "attn_implementation": recipe.model.attn_implementation, "device": dist.device.type,
            "strategy": dist.strategy, "world_size": dist.world, "torch": torch.__version__}


def score_cache_dir(recipe: Recipe) -> Path | None:
    """Beside the token cache when a recipe names one (the harness keeps its caches per run folder)."""
    return Path(recipe.data.cache_dir).expanduser() / "base_scores" if recipe.data.cache_dir else None


def prepare_output_dir(out: Path, overwrite: bool, resume: str | None, dist) -> Path | None:
    """Refuse to mix runs in one folder; return the checkpoint to resume from, if any."""
    finished = (out / "metrics.json").exists()
    existing = checkpoint.checkpoint_dirs(out)
    if overwrite:
        dist.barrier()
        if dist.is_main:  # nothing of the old run may be mistaken for the new one's
            for name in ("metrics.json", "tuned", "adapter", checkpoint.CHECKPOINTS, "log.jsonl", "tb"):
                path = out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        dist.barrier()
        finished, existing = False, []
    if finished:
        raise OutputDirError(f"{out}: holds a finished run (metrics.json); pick another output_dir "
                             f"or pass --overwrite")
    resume_from = None
    if resume == "auto":
        resume_from = existing[-1] if existing else None
    elif resume:
        resume_from = Path(resume)
        if not (resume_from / "state.json").exists():
            raise checkpoint.CheckpointError(f"{resume_from}: not a checkpoint (no state.json)")
    elif existing:
        raise OutputDirError(f"{out}: holds checkpoints of an unfinished run; continue it with "
                             f"--resume auto, or start over with --overwrite")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return resume_from


def run_fingerprint(recipe: Recipe, model, n_train: int, n_eval: int, dist) -> dict:
    """What must not change between a checkpoint and the run that resumes from it."""
    shapes = hashlib.sha256("".join(f"{k}{tuple(v.shape)}" for k, v in model.state_dict().items()).encode())
    return {
        "model": recipe.model.name_or_path, "weights_shape_sha256": shapes.hexdigest(),
        "world_size": dist.world, "strategy": dist.strategy, "replicas": recipe.distributed.replicas,
        "batch_size": recipe.train.batch_size, "grad_accum": recipe.train.grad_accum,
        "max_length": recipe.data.max_length, "train_n": n_train, "eval_n": n_eval,
        "seed": recipe.seed, "peft": recipe.peft.method,
    }


def check_fingerprint(folder: Path, saved: dict, now: dict) -> None:
    for key, value in now.items():
        if saved.get(key) != value:
            raise checkpoint.CheckpointError(
                f"{folder}: written by a different run ({key} was {saved.get(key)!r}, now {value!r})")


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory so far: allocated on the GPU, or resident (max RSS) on CPU."""
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_of": "cuda max_memory_allocated"}
    # ru_maxrss is in KiB on Linux; it covers the whole process, loading included
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
            "peak_memory_of": "process max RSS"}


def check_sizes(n_train: int, n_eval: int, cfg, dist) -> None:
    step = cfg.batch_size * cfg.grad_accum * dist.world
    if n_train < step:
        raise DataError(
            f"{n_train} training examples cannot fill one step of {step} "
            f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {dist.world} processes)")
    if n_eval < dist.world:
        raise DataError(f"{n_eval} eval examples for {dist.world} processes: need at least one each")


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
                 f"whole run {report['wall_seconds']:.0f}s; peak memory {t['peak_memory_mb']:.0f} MB")
    if "peft" in report:
        p, c = report["peft"], report["params"]
        lines.append(f"{p['method']}: {c['trainable_params']:,} of {c['total_params']:,} parameters trained "
                     f"({c['trainable_share']:.2%}); adapter: {p['adapter']['path']}")
    return "\n".join(lines)
