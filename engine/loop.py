"""The training loop. train_step: micro-batches -> loss -> backward -> clip -> step -> schedule;
train: runs the steps and keeps the books (logging, evals, checkpoint timing, signals) through hooks.

One loop for every strategy: DDP, FSDP and PEFT change how the model is wrapped (engine/
distributed.py, engine/adapters.py), never these lines.

A step that neither logs, evaluates nor saves reads nothing back from the device, so the host queues
the next step while the device runs this one: the loss, the non-finite flag (engine/guard.py), the
examples' weight sum and the signals are read where the loop reads anyway (the read points).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine import compiling
from engine.batching import Tokenized, collate, model_inputs, prefetch, train_steps
from engine.config import TrainConfig
from engine.errors import DataError, RecipeError, StopTraining
from engine.guard import StepGuard
from engine.metrics import Throughput


def total_steps(n_examples: int, cfg: TrainConfig, dp_world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps the run takes) over `dp_world` data-parallel ranks."""
    per_epoch = n_examples // (cfg.batch_size * cfg.grad_accum * dp_world)
    steps = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    return per_epoch, steps


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float, dist) -> torch.Tensor:
    """Total gradient norm over all ranks' shards; clip to max_norm when max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = dist.full_tensor(torch.nn.utils.get_total_norm(grads))  # FSDP: sharded grads, sharded norm
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@dataclass
class LoopState:
    """Where a run is: with the weights, optimizer and RNGs, all a checkpoint needs to continue."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch being trained
    step_in_epoch: int = 0  # steps of that epoch already taken: resume jumps past them
    final_loss: float = float("nan")
    skipped_steps: int = 0  # fp16 steps the scaler skipped for inf/NaN gradients (counted at each read)
    window: list = field(default_factory=lambda: [0.0, 0.0])  # loss sum, examples since last log
    evals: list = field(default_factory=list)  # {"step", "epoch", **metrics}
    best: dict | None = None  # the best eval so far by train.select_metric (tuned/ under keep_best)
    stale_evals: int = 0  # evaluations since `best` (early stopping's patience counter)
    stopped_early: bool = False  # train.early_stopping_patience ran out: the loop ends


@dataclass
class Hooks:
    """What the loop calls out to; the loop itself knows nothing of files or signals."""
    evaluate: Callable[[], dict]
    keep_best: Callable[[LoopState], None] = lambda state: None  # a new best eval: save its weights
    checkpoint: Callable[[LoopState], None] = lambda state: None
    stop_requested: Callable[[], bool] = lambda: False  # asked at the read points only: it may read too


def forward_backward(model, micro: list[dict], precision, dist, window: torch.Tensor,
                     class_weights: torch.Tensor | None = None) -> None:
    """Forward and backward over the micro-batches of one optimizer step; gradients accumulate.

    The loss is the mean over every example of the global step, or with `class_weights` the
    weighted mean (torch's cross_entropy(weight=...) over the whole global step: sum of w_y * loss
    over sum of w_y), so accumulation and data parallelism give the gradient of one big batch.
    Adds each micro-batch's loss sum and example count (weight sum) to `window` (on the device).
    """
    if class_weights is None:
        examples = sum(len(b["labels"]) for b in micro) * dist.dp_world  # in the whole global step
        scale = dist.dp_world / examples
    else:
        # the global step's class counts (integers: exact, whatever the order of summing), then
        # their weights in float64: every rank and every accumulation split gets the same denominator,
        # which stays on the device (a float() of it would make the host wait for the step)
        counts = sum(torch.bincount(b["labels"], minlength=len(class_weights)) for b in micro)
        counts = dist.all_reduce_sum(counts.to(dist.device, non_blocking=True))
        scale = (dist.dp_world / (counts.double() * class_weights.double()).sum()).float()
    for m, batch in enumerate(micro):
        labels = batch["labels"].to(dist.device, non_blocking=True)
        with dist.grad_sync(model, sync=m == len(micro) - 1):
            with precision.autocast():
                logits = model(**model_inputs(batch, dist.device)).logits
            loss_sum = F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="sum")
            # sum over every example of the global step / their count; DDP and FSDP
            # average gradients over the data-parallel ranks, hence the factor dp_world
            precision.backward(loss_sum * scale)
        window[0] += loss_sum.detach()
        window[1] += len(labels) if class_weights is None else class_weights[labels].sum().detach()


def loss_weights(spec, train_labels: np.ndarray, label_names: list[str]) -> np.ndarray | None:
    """train.class_weights as one weight per class (None: unweighted). balanced: n / (K * n_k) over the
    train split, so that every class weighs the same in the loss (scikit-learn's "balanced")."""
    if spec in (None, "none"):
        return None
    k = len(label_names)
    if spec == "balanced":
        counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=k)
        if (counts == 0).any():
            absent = [label_names[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(f"train.class_weights=balanced: no training example of class {', '.join(absent)}")
        return len(train_labels) / (k * counts.astype(np.float64))
    if len(spec) != k:
        raise RecipeError(f"'train.class_weights' has {len(spec)} weights for {k} classes ({', '.join(label_names)})")
    return np.asarray(spec, dtype=np.float64)


def train_step(model, optimizer, scheduler, micro: list[dict], params: list[torch.Tensor], cfg: TrainConfig,
               precision, dist, state: LoopState, window: torch.Tensor, guard: StepGuard,
               class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step: micro-batches, loss, backward, clip, step, schedule. Returns the grad norm
    (on the device). A non-finite norm changes no weight; `guard` keeps the verdict for the next read."""
    forward_backward(model, micro, precision, dist, window, class_weights)
    precision.unscale(optimizer)
    norm = grad_norm_and_clip(params, cfg.max_grad_norm, dist)
    precision.step(optimizer, guard.flag(norm, state.step + 1))
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.step_in_epoch += 1
    return norm


def step_batches(data: Tokenized, micro: list[np.ndarray], pad_id: int, pad_left: bool,
                 buckets: list[int] | None) -> tuple[list[dict], tuple[int, int, int]]:
    """One step's micro-batches and its (examples, real tokens, padded tokens), counted from the token
    ids on the host as the batches are built: the clock counts without reading a tensor back."""
    batches = [collate(data, idx, pad_id, pad_left, buckets=buckets) for idx in micro]
    real = sum(len(data.ids[i]) for idx in micro for i in idx)
    return batches, (sum(map(len, micro)), real, sum(b["input_ids"].numel() for b in batches))


def improves(metrics: dict, best: dict | None, metric: str) -> bool:
    """Strictly better than the best so far by `metric` (loss: lower is better)."""
    if best is None:
        return True
    return metrics[metric] < best[metric] if metric == "loss" else metrics[metric] > best[metric]


class Bookkeeping:
    """Around the steps: logging, evals, checkpoints and stops, on a clock that counts training only.

    Only the read points (a logged step, an eval, a checkpoint, the end) read anything back from the
    device; each one first settles the non-finite steps flagged since the last (`settle`).
    """

    def __init__(self, state: LoopState, cfg: TrainConfig, dist, hooks: Hooks, tracker, checkpoint_every: int,
                 guard: StepGuard | None = None):
        self.state, self.cfg, self.dist, self.hooks, self.tracker = state, cfg, dist, hooks, tracker
        self.checkpoint_every = checkpoint_every
        self.guard = guard or StepGuard(stops=True)
        self.clock = Throughput()
        self.window = torch.tensor(state.window, dtype=torch.float64, device=dist.device)  # no sync per step
        self.logged_at = state.step
        if state.step:
            tracker.progress(state.step)

    def after_step(self, norm: torch.Tensor, lr: float, n_steps: int, at_epoch_end: bool) -> None:
        state, cfg = self.state, self.cfg
        log = state.step % cfg.log_every == 0 or state.step == n_steps
        evaluate = cfg.eval_every and state.step % cfg.eval_every == 0
        save = self.checkpoint_every and state.step % self.checkpoint_every == 0 and not at_epoch_end
        if not (log or evaluate or save):
            return  # nothing read back: the host goes on queueing while the device computes
        if log:
            self.log(norm, lr)
        if evaluate:
            self.evaluate()
        if save:
            self.save()
        if self.hooks.stop_requested():
            self.save()
            raise StopTraining(f"stopped by a signal at step {state.step}")

    def settle(self) -> None:
        """At a read point: the non-finite steps since the last. fp32/bf16: the run stops, and no weight
        changed from the first of them on; fp16: the scaler skipped them, they are counted."""
        count, first, norm = self.guard.read()
        if count and self.guard.stops:
            raise StopTraining(f"step {first}: loss or gradients are not finite (grad norm {norm}); no weight "
                               f"changed from then on ({count} non-finite step(s) in steps {first}-{self.state.step}): "
                               f"the weights are those of step {first - 1}")
        self.state.skipped_steps += count

    def log(self, norm: torch.Tensor, lr: float) -> None:
        self.settle()
        state, world = self.state, self.dist.dp_world  # each data-parallel rank counts its own examples
        loss_sum, weight = self.dist.all_reduce_sum(self.window.clone()).tolist()
        # the weighted mean over the steps since the last log: sum of w_y x loss over sum of w_y
        state.final_loss = loss_sum / weight if weight > 0 else float("nan")
        rate = self.clock.summary()
        self.tracker.scalars(state.step, {
            "train/loss": state.final_loss, "train/lr": lr,
            "train/grad_norm": float(norm), "train/samples_per_s": rate["samples_per_s"] * world,
            "train/tokens_per_s": rate["real_tokens_per_s"] * world,
            "train/padding_share": rate["padding_share"],
            "train/seconds": self.clock.elapsed(),  # the training clock: evals and checkpoints excluded
        })
        self.tracker.progress(state.step - self.logged_at, loss=state.final_loss,
                              samples_s=rate["samples_per_s"] * world)
        self.logged_at = state.step
        self.window.zero_()

    def evaluate(self) -> None:
        state = self.state
        self.settle()  # before the clock stops: the read waits for the steps still running
        if state.evals and state.evals[-1]["step"] == state.step:
            return  # an epoch end that eval_every already covered
        self.clock.pause()
        try:
            metrics = self.hooks.evaluate()
        finally:
            self.clock.start()
        state.evals.append({"step": state.step, "epoch": state.epoch, **metrics})
        self.tracker.scalars(state.step, {k: metrics[k] for k in ("accuracy", "f1", "loss", "ece")}, "eval/")
        self.tracker.message(f"step {state.step}: eval accuracy {metrics['accuracy']:.4f}  f1 {metrics['f1']:.4f}")
        # every rank takes rank 0's decision: keep_best's hook gathers weights (a collective under
        # FSDP), and a rank that alone stopped early would leave the others waiting
        improved = self.dist.broadcast_object(improves(metrics, state.best, self.cfg.select_metric))
        if improved:
            state.best, state.stale_evals = state.evals[-1], 0
            if self.cfg.keep_best:
                self.hooks.keep_best(state)
        else:
            state.stale_evals += 1
        patience = self.cfg.early_stopping_patience
        if patience and state.stale_evals >= patience:
            state.stopped_early = True
            metric, best = self.cfg.select_metric, state.best
            self.tracker.message(f"early stop at step {state.step}: eval {metric} has not improved for "
                                 f"{patience} evaluation(s) (best {best[metric]:.4f} at step {best['step']})")

    def save(self) -> None:
        self.settle()  # a checkpoint never holds a state after a non-finite step
        self.clock.pause()
        self.state.window = self.window.tolist()
        self.hooks.checkpoint(self.state)
        self.clock.start()

    def throughput(self, steps_per_epoch: int) -> dict:
        self.settle()
        self.clock.pause()
        rate = self.clock.summary()
        # each rank counted its own share: the global rate is their sum
        summed = self.dist.all_reduce_sum(torch.tensor(
            [rate["samples"], rate["samples_per_s"], rate["real_tokens_per_s"], rate["padded_tokens_per_s"]],
            dtype=torch.float64, device=self.dist.device)).tolist()
        return {
            "steps": self.state.step, "steps_per_epoch": steps_per_epoch, "train_seconds": rate["train_seconds"],
            "samples": int(summed[0]), "samples_per_s": summed[1],
            "real_tokens_per_s": summed[2], "padded_tokens_per_s": summed[3],
            "padding_share": rate["padding_share"], "skipped_steps": self.state.skipped_steps,
        }


def train(model, optimizer, scheduler, data: Tokenized, cfg: TrainConfig, precision, dist, *,
          seed: int, pad_id: int, pad_left: bool, hooks: Hooks, tracker, checkpoint_every: int = 0,
          state: LoopState | None = None, class_weights: torch.Tensor | None = None,
          buckets: list[int] | None = None) -> tuple[LoopState, dict]:
    """Train to the end (or a stop); returns the final state and the throughput summary.
    `class_weights`: one per class, on dist.device, for a weighted loss (see forward_backward);
    `buckets`: data.pad_buckets, the lengths batches are padded to (engine/batching.py pad_width)."""
    steps_per_epoch, n_steps = total_steps(len(data), cfg, dist.dp_world)
    params = [p for p in model.parameters() if p.requires_grad]
    state = state or LoopState()
    guard = StepGuard(stops=precision.scaler is None)
    books = Bookkeeping(state, cfg, dist, hooks, tracker, checkpoint_every, guard)
    model.train()
    books.clock.start()
    while state.step < n_steps and not state.stopped_early:
        plan = train_steps(data.lengths, cfg.batch_size, cfg.grad_accum, state.epoch, seed, dist.dp_world,
                           dist.dp_rank, cfg.group_by_length)
        epoch_len = len(plan)
        plan = plan[state.step_in_epoch: state.step_in_epoch + n_steps - state.step]
        steps = prefetch(step_batches(data, micro, pad_id, pad_left, buckets) for micro in plan)
        for micro, counts in steps:
            norm = train_step(model, optimizer, scheduler, micro, params, cfg, precision, dist, state, books.window,
                              guard, class_weights)
            books.clock.add(*counts)
            books.after_step(norm, scheduler.get_last_lr()[0], n_steps, state.step_in_epoch == epoch_len)
            if state.stopped_early:  # by an eval_every evaluation, inside the epoch
                break
        if state.stopped_early:
            break
        state.epoch += 1
        state.step_in_epoch = 0
        books.evaluate()  # at each epoch end, and at the last step
        books.save()
    # a compiled model's graphs and compile seconds (this process's): they fall inside the first steps
    return state, {**books.throughput(steps_per_epoch), **compiling.stats(model)}
