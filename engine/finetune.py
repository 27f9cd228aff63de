"""One fine-tuning run, top to bottom: recipe -> data -> model -> base snapshot -> loop -> tuned.

Read `finetune()` to know what `launch/train.py` does: it is the table of contents of a run, one
stage a line, in the order they happen; each stage below it calls the components that do the work.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from engine import adapters, batching, checkpoint, compiling, distributed, loop, modeling, optim, signals, sources
from engine import precision as precision_lib
from engine import report as report_lib
from engine import resume as resume_lib
from engine.batching import Tokenized
from engine.checkpoint import BEST, best_weights_file
from engine.config import Recipe
from engine.distributed import Dist
from engine.errors import DataError
from engine.evaluation import cached_score, eval_set_digest, evaluate
from engine.metrics import TimeParts
from engine.precision import Precision
from engine.report import Scores, Trained
from engine.sources import Splits
from engine.tracking import Tracker, check_mlflow, ends_open_runs, recipe_params


@dataclass
class Run:
    """What every stage reads: the recipe as it runs, the processes, the precision, where, the clock."""
    recipe: Recipe  # train.precision is the one chosen (auto resolved)
    dist: Dist
    choice: precision_lib.Choice  # which precision, as asked, and why
    precision: Precision
    out: Path
    parts: TimeParts  # wall seconds by part: load, tokenize, base_eval, train, tuned_eval, save, other
    resumed: resume_lib.Resumed | None  # the checkpoint continued from, checked against this recipe

    @property
    def resume_from(self) -> Path | None:
        return self.resumed.folder if self.resumed else None


@dataclass
class RunData:
    splits: Splits
    tokenizer: object
    train: Tokenized
    eval: Tokenized
    test: Tokenized | None  # data.test_split: base/ and tuned/ are scored on it once, at the end
    class_weights: np.ndarray | None = None  # train.class_weights, one per class (None: unweighted loss)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def pad_left(self) -> bool:
        return self.tokenizer.padding_side == "left"


@ends_open_runs  # a failure ends the run's MLflow run FAILED (a stop: KILLED), not RUNNING
def finetune(recipe: Recipe, overwrite: bool = False, resume: str | None = None) -> dict:
    """Run a recipe to the end; `resume` is "auto" (latest checkpoint in output_dir) or a folder."""
    run = start(recipe, overwrite, resume)  # processes, precision, output_dir; the recipe against a checkpoint
    seed_everything(run.recipe.seed)  # the head's initialisation is seeded, and identical on every rank
    data, model = load(run)  # splits, tokenizer, token ids; the classifier
    attention = modeling.attn_implementation(model)
    # what a checkpoint of this run carries; the one resumed must share its model, data and processes
    fingerprint = resume_lib.fingerprint(run.recipe, run.resumed, model, data.splits.label_names, len(data.train),
                                         len(data.eval), loop.total_steps(len(data.train), run.recipe.train,
                                                                          run.dist.dp_world)[1], run.dist)
    report_lib.record_recipe(run)  # recipe.yaml, now that the run goes ahead
    saved = run.resumed.state if run.resumed else None  # the state resumed from, if any
    base_sha = None if saved else save_base(run, model, data.tokenizer)
    model = convert(run, model)  # the model transforms: activation checkpointing, LoRA / QLoRA
    counts = modeling.param_counts(model)
    model = wrap(run, model)  # the strategy's wrapping, then torch.compile
    seed_rank(run.recipe.seed, run.dist.rank)  # dropout differs across ranks; every init above was identical
    base_metrics, base_reused = score_base(run, model, data, base_sha, saved, attention)
    tracker = open_tracker(run, data, attention, base_metrics, base_reused, counts, saved)
    state, throughput = train(run, model, data, tracker, saved,
                              {"fingerprint": fingerprint, "base_metrics": base_metrics})
    # the last checkpoint holds all the training: a signal from here stops at once, in one line
    after = signals.StopRequest(run.dist).at_once("after training, in the final scoring")
    with resume_lib.resumable(run.out, tracker), after:
        peak = report_lib.peak_memory(run.dist)
        chosen = state.best if run.recipe.train.keep_best else state.evals[-1]  # the eval kept as tuned/
        tuned_sha, exported = export_tuned(run, model, data.tokenizer)  # into the staging folder
        scores = final_scores(run, data, base_metrics, base_reused, chosen, tracker, base_sha, attention)
        report = None
        if run.dist.is_main:
            trained = Trained(state, throughput, peak, chosen, tuned_sha, base_sha, exported)
            report = report_lib.build(run, data, scores, trained, counts, attention)
            checkpoint.publish(staging(run.out), run.out)  # tuned/ (adapter/) appear now, metrics.json last
            report_lib.write(run, report, tracker)
    run.dist.barrier()
    run.dist.close()
    return report


# --------------------------------------------------------------------------------------------
# The stages, in the order they run


def start(recipe: Recipe, overwrite: bool, resume: str | None) -> Run:
    """Join the process group, choose the precision, prepare output_dir, and check the recipe against
    the checkpoint resumed (before any work: a key that may not change is refused in one line)."""
    parts = TimeParts()
    dist = distributed.init(recipe.distributed, recipe.train.num_threads)
    check_mlflow(recipe.tracking, dist)  # a tracking store that cannot be used stops here, before any work
    say = print if dist.is_main else (lambda text: None)
    # one rank probes the CPU (after init: the probe runs on the threads training will use)
    choice = precision_lib.choose(recipe.train.precision, dist.device, dist.broadcast_object, say, dist.is_main)
    say(choice.describe())
    precision = Precision(choice.name, dist.device)
    out = Path(recipe.output_dir)
    resume_from, finished = resume_lib.prepare_output_dir(out, overwrite, resume, dist)
    resume_lib.check_shared(out, dist)  # before any rank writes there on its own
    # from here on the recipe says what runs: the adapters' compute dtype reads it too
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, precision=choice.name))
    resumed = resume_lib.open_checkpoint(resume_from, out, finished, recipe, say) if resume_from else None
    return Run(recipe, dist, choice, precision, out, parts, resumed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """Each rank's own torch stream, from (seed, rank): the same masks on every rank would make
    dropout (and the adapters' dropout) one mask per global step instead of one per example.
    Called after every seeded initialisation (the head, the adapters), which must agree across
    ranks; the data order has its own generator (batching.train_steps), and a resume restores
    each rank's stream from its checkpoint."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def load(run: Run) -> tuple[RunData, nn.Module]:
    """The splits, the tokenizer and the model (its head initialised now), then the token ids."""
    recipe, d = run.recipe, run.recipe.data
    with run.parts.part("load"):
        splits = sources.load_splits(d, recipe.seed, lambda: modeling.config_label_names(recipe.model))
        tokenizer = modeling.load_tokenizer(recipe.model)
        model = modeling.load_model(recipe.model, splits.label_names, tokenizer)
        modeling.check_max_length(model, d.max_length, recipe.model.name_or_path)

    def tokenize(examples):
        return batching.tokenize(examples, tokenizer, d.max_length, d.cache_dir,
                                 truncation=d.truncation, head_tokens=d.head_tokens)

    with run.parts.part("tokenize"):
        data = RunData(splits, tokenizer, tokenize(splits.train), tokenize(splits.eval),
                       tokenize(splits.test) if splits.test else None)
    check_sizes(len(data.train), len(data.eval), recipe.train, run.dist)
    data.class_weights = loop.loss_weights(recipe.train.class_weights, data.train.labels, splits.label_names)
    return data, model


def save_base(run: Run, model: nn.Module, tokenizer) -> str | None:
    """base/ (rank 0; its sha256): fine-tuning overwrites the weights in place, so keep them first."""
    if not run.dist.is_main:
        return None
    with run.parts.part("save"):
        return checkpoint.save_snapshot(model, tokenizer, run.out / "base", recipe=run.recipe)


def convert(run: Run, model: nn.Module) -> nn.Module:
    """The model transforms, in one place, before wrapping (torchtitan's "model converters").

    The adapters go on after base/ is saved, so base/ stays the plain model; QLoRA swaps in a 4-bit
    copy of base/ and makes the recipe's activation-checkpointing choice on it again.
    """
    recipe = run.recipe
    if recipe.train.activation_checkpointing:
        modeling.enable_activation_checkpointing(model)
    if recipe.peft.method != "none":
        with run.parts.part("load"):
            model = adapters.attach(model, recipe, run.out / "base", run.dist)
    return model


def wrap(run: Run, model: nn.Module) -> nn.Module:
    model = run.dist.wrap(model, run.precision.dtype)
    return compiling.compile_model(model, run.recipe) if run.recipe.train.compile else model


def score(run: Run, model: nn.Module, data: RunData, dataset: Tokenized) -> dict:
    return evaluate(model, dataset, data.splits.label_names, run.recipe.train.eval_batch_size, run.precision,
                    run.dist, data.pad_id, data.pad_left, buckets=run.recipe.data.pad_buckets)


def score_base(run: Run, model: nn.Module, data: RunData, base_sha: str | None,
               saved: dict | None, attention: str) -> tuple[dict, bool]:
    """(the base model's eval metrics, reused): from the checkpoint resumed, an earlier run's score of
    the same base and eval set, or scored now."""
    with run.parts.part("base_eval"):
        if saved:
            return saved["base_metrics"], True
        key = base_score_key(run, base_sha, data, data.eval, attention) if base_sha else None
        return cached_score(key, lambda: score(run, model, data, data.eval), run.dist,
                            score_cache_dir(run.recipe))


def open_tracker(run: Run, data: RunData, attention: str, base_metrics: dict, base_reused: bool, counts: dict,
                 saved: dict | None) -> Tracker:
    """The log (TensorBoard, log.jsonl, progress bar, MLflow), opened with what the run is about to do."""
    dist, splits, peft = run.dist, data.splits, run.recipe.peft.method
    tracker = Tracker(run.out, dist.is_main, loop.total_steps(len(data.train), run.recipe.train, dist.dp_world)[1],
                      run.recipe.tracking, recipe_params(run.recipe), saved["loop"]["step"] if saved else None)
    tracker.message(f"train {len(data.train)} examples from {splits.train.origin}; "
                    f"eval {len(data.eval)} from {splits.eval.origin}; "
                    + (f"test {len(data.test)} from {splits.test.origin}; " if data.test else "")
                    + f"{dist.world} process(es), "
                    f"{torch.get_num_threads()} thread(s) each, strategy {dist.strategy}, "
                    f"{run.choice.describe()}, attention {attention}")
    if sources.numbered(splits.label_names):
        tracker.message(f"integer labels {', '.join(splits.label_names)} are classes 0..{len(splits.label_names) - 1}, "
                        f"named by their value")
    cached_note = " (reused: an earlier run scored this base on this eval set)" if base_reused and not saved else ""
    on_dev = f" on dev (n {len(data.eval)})" if data.test else ""  # test: scored at the end
    tracker.message(f"base{' (4-bit, as it trains)' if peft == 'qlora' else ''}{on_dev}: "
                    f"accuracy {base_metrics['accuracy']:.4f}  f1 {base_metrics['f1']:.4f}{cached_note}")
    if peft != "none":
        tracker.message(f"{peft}: {counts['trainable_params']:,} of {counts['total_params']:,} parameters "
                        f"train ({counts['trainable_share']:.2%})")
    return tracker


def train(run: Run, model: nn.Module, data: RunData, tracker: Tracker, saved: dict | None,
          run_state: dict) -> tuple[loop.LoopState, dict]:
    """Optimizer and schedule, the checkpoint resumed from, then the loop to the end (or a stop).
    `run_state` goes into every checkpoint beside the loop's position."""
    dist, cfg = run.dist, run.recipe.train
    optimizer = optim.build_optimizer(model, cfg)  # after wrapping: FSDP swaps the parameters
    scheduler = optim.build_schedule(optimizer, cfg, loop.total_steps(len(data.train), cfg, dist.dp_world)[1])
    state = None
    if saved:
        state = loop.LoopState(**resume_lib.restore(run.resumed, run.out, model, optimizer, scheduler, run.precision,
                                                    dist, {BEST: best_weights_file(run.out)}, tracker.message))
    stop = signals.StopRequest(dist)
    hooks = loop_hooks(run, model, optimizer, scheduler, data, run_state, stop.requested)
    try:
        with stop.installed(), run.parts.part("train"):  # its evals and saves count as their own parts
            return loop.train(model, optimizer, scheduler, data.train, cfg, run.precision, dist, seed=run.recipe.seed,
                              pad_id=data.pad_id, pad_left=data.pad_left, hooks=hooks, tracker=tracker,
                              checkpoint_every=run.recipe.checkpoint.every, state=state,
                              buckets=run.recipe.data.pad_buckets,
                              class_weights=None if data.class_weights is None else
                              torch.tensor(data.class_weights, dtype=torch.float32, device=dist.device))
    except loop.StopTraining as e:
        raise resume_lib.stopped(e, run.out, tracker) from None


def loop_hooks(run: Run, model: nn.Module, optimizer, scheduler, data: RunData, run_state: dict,
               stop_requested) -> loop.Hooks:
    """What the loop calls out to: eval, keep the best weights, write a checkpoint, stop."""
    dist, parts, keep = run.dist, run.parts, run.recipe.checkpoint.keep

    def evaluate_tuned() -> dict:
        with parts.part("tuned_eval"):
            return score(run, model, data, data.eval)

    def keep_best(s: loop.LoopState) -> None:
        with parts.part("save"):
            weights = dist.full_state_dict(model)
            if dist.is_main:
                checkpoint.save_weights(best_weights_file(run.out), weights)

    def save_checkpoint(s: loop.LoopState) -> None:
        if keep:
            with parts.part("save"):
                # the best weights so far go with the state that names them (s.best)
                checkpoint.save_training_state(run.out, s.step, model, optimizer, scheduler, run.precision, dist,
                                               keep=keep, state={"loop": dataclasses.asdict(s), **run_state},
                                               extra={BEST: best_weights_file(run.out)})

    return loop.Hooks(evaluate=evaluate_tuned, keep_best=keep_best, checkpoint=save_checkpoint,
                      stop_requested=stop_requested)


def staging(out: Path) -> Path:
    """Where tuned/ and adapter/ are written and scored; moved into output_dir when the run is done."""
    return out / resume_lib.STAGING


def export_tuned(run: Run, model: nn.Module, tokenizer) -> tuple[str | None, dict | None]:
    """tuned/ from the best eval's weights when kept, else the final ones; with LoRA / QLoRA also
    adapter/ (tuned/ is then the adapter merged into base/). Written into the staging folder: a
    crash before the run ends leaves no tuned/ that looks finished. Returns (tuned/'s sha256, the
    adapter export's facts or None) on rank 0, (None, None) elsewhere. Every rank calls."""
    dist = run.dist
    if run.recipe.train.keep_best:
        weights = checkpoint.load_weights(best_weights_file(run.out)) if dist.is_main else {}
    else:
        weights = dist.full_state_dict(model)
    if not dist.is_main:
        return None, None
    with run.parts.part("save"):
        if run.recipe.peft.method in adapters.ADAPTER_METHODS:  # head-only: a plain snapshot, below
            exported = adapters.export(dist.unwrap(model), weights, run.out / "base", staging(run.out), tokenizer,
                                       run.recipe)
            return exported["tuned_sha256"], exported
        return checkpoint.save_snapshot(dist.unwrap(model), tokenizer, staging(run.out) / "tuned",
                                        state_dict=weights, recipe=run.recipe), None


def final_scores(run: Run, data: RunData, base_metrics: dict, base_reused: bool, chosen: dict,
                 tracker: Tracker, base_sha: str | None, attention: str) -> Scores:
    """What is reported is base/ and tuned/ as saved.

    The evals during training scored the model as it trained, which is not what was saved when QLoRA
    trained a 4-bit copy, or when FSDP's mixed precision ran forward on bf16/fp16 copies of the
    weights: those runs score the snapshots again (fp32 weights, under the same autocast as one
    process). With data.test_split the snapshots are scored once on test, and the eval split only
    selected (its figures go to `dev`). base/ scored as saved is cached like the base score, so a
    sweep on one base scores it once; `base_reused` says whether the reported base figure was reused.
    """
    dist = run.dist
    tuned_metrics = {k: v for k, v in chosen.items() if k not in ("step", "epoch")}
    as_trained = {"base": base_metrics, "tuned": tuned_metrics}
    rescore = run.recipe.peft.method == "qlora" or dist.forward_casts_weights(run.precision.dtype)
    if data.test is not None or rescore:
        dist.barrier()  # tuned/ is on disk
        final_set = data.eval if data.test is None else data.test
        with run.parts.part("base_eval"):
            key = base_score_key(run, base_sha, data, final_set, attention, snapshot=True) if base_sha else None
            base_metrics, base_reused = cached_score(
                key, lambda: score_snapshot(run, data, run.out / "base", final_set), dist, score_cache_dir(run.recipe))
        with run.parts.part("tuned_eval"):
            tuned_metrics = score_snapshot(run, data, staging(run.out) / "tuned", final_set)
    if data.test is not None:
        tracker.message(f"test: base accuracy {base_metrics['accuracy']:.4f}, tuned {tuned_metrics['accuracy']:.4f} "
                        f"(n {tuned_metrics['n']}); selected on dev: tuned {as_trained['tuned']['accuracy']:.4f}")
    return Scores(base_metrics, tuned_metrics, as_trained, rescore, base_reused)


def score_snapshot(run: Run, data: RunData, folder: Path, dataset: Tokenized) -> dict:
    """A saved snapshot, loaded in full precision and scored on every rank. Under FSDP only rank 0
    loads it, and every rank holds its shard of the fp32 weights, as in training: a whole copy per
    rank is what FSDP exists to avoid."""
    dist = run.dist

    def load() -> nn.Module:
        return modeling.load_model(dataclasses.replace(run.recipe.model, name_or_path=str(folder), revision=None))

    if dist.shards_state:
        snapshot = dist.shard_snapshot(load, lambda config: modeling.model_from_config(config, run.recipe.model))
    else:
        snapshot = load().to(dist.device)
    return score(run, snapshot, data, dataset)


# --------------------------------------------------------------------------------------------
# Checks and keys


def base_score_key(run: Run, base_sha: str, data: RunData, dataset: Tokenized, attention: str,
                   snapshot: bool = False) -> dict:
    """Everything a base score depends on; {} (never cached) for QLoRA's base as it trains (the 4-bit
    copy). `snapshot`: base/ as saved, loaded plain (no adapter, no wrapping) and scored on `dataset`."""
    recipe, dist = run.recipe, run.dist
    if recipe.peft.method == "qlora" and not snapshot:
        return {}
    t = recipe.train
    key = {"base_sha256": base_sha, "eval_set_sha256": eval_set_digest(dataset), "labels": data.splits.label_names,
           "precision": t.precision, "eval_batch_size": t.eval_batch_size, "pad_buckets": recipe.data.pad_buckets,
           "attn_implementation": attention,
           "device": dist.device.type, "torch": torch.__version__, "transformers": transformers.__version__}
    if snapshot:
        return {**key, "scored": "base/ as saved"}
    return {**key, "compile": t.compile, "strategy": dist.strategy, "world_size": dist.world}


def score_cache_dir(recipe: Recipe) -> Path | None:
    """Inside the token cache when a recipe names one (the harness names one per matrix: its runs on
    one base and eval set share the score), else the user cache."""
    return Path(recipe.data.cache_dir).expanduser() / "base_scores" if recipe.data.cache_dir else None


def check_sizes(n_train: int, n_eval: int, cfg, dist) -> None:
    """One global step must fill, and every data-parallel rank needs an eval example."""
    step = cfg.batch_size * cfg.grad_accum * dist.dp_world
    if n_train < step:
        raise DataError(
            f"{n_train} training examples cannot fill one step of {step} "
            f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {dist.dp_world} processes)")
    if n_eval < dist.dp_world:
        raise DataError(f"{n_eval} eval examples for {dist.dp_world} processes: need at least one each")
