"""The training loop: micro-batches -> loss -> backward -> clip -> step -> schedule, plus eval hooks.

One loop for every strategy: DDP, FSDP and PEFT change how the model is wrapped (engine/
distributed.py, engine/adapters.py), never these lines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine.config import TrainConfig
from engine.data import Tokenized, collate, model_inputs, prefetch, train_steps
from engine.errors import StopTraining
from engine.metrics import Throughput


def total_steps(n_examples: int, cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps the run takes)."""
    per_epoch = n_examples // (cfg.batch_size * cfg.grad_accum * world)
    steps = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    return per_epoch, steps


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm over all ranks' shards; clip to max_norm when max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # FSDP: the norm of sharded grads is itself sharded
        norm = norm.full_tensor()
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
    skipped_steps: int = 0  # fp16 steps the scaler skipped for inf/NaN gradients
    window: list = field(default_factory=lambda: [0.0, 0.0])  # loss sum, examples since last log
    evals: list = field(default_factory=list)  # {"step", "epoch", **metrics}
    best: Optional[dict] = None  # the eval kept as tuned/ (keep_best)


@dataclass
class Hooks:
    """What the loop calls out to; the loop itself knows nothing of files or signals."""
    evaluate: Callable[[], dict]
    keep_best: Callable[[LoopState], None] = lambda state: None  # a new best eval: save its weights
    checkpoint: Callable[[LoopState], None] = lambda state: None
    stop_requested: Callable[[], bool] = lambda: False


def train(model, optimizer, scheduler, data: Tokenized, cfg: TrainConfig, precision, dist, *,
          seed: int, pad_id: int, pad_left: bool, hooks: Hooks, tracker, checkpoint_every: int = 0,
          state: Optional[LoopState] = None) -> tuple[LoopState, dict]:
    """Train to the end (or a stop); returns the final state and the throughput summary."""
    steps_per_epoch, n_steps = total_steps(len(data), cfg, dist.world)
    params = [p for p in model.parameters() if p.requires_grad]
    state = state or LoopState()
    clock = Throughput()
    window = torch.tensor(state.window, dtype=torch.float64, device=dist.device)  # no sync per step
    logged_at = state.step
    if state.step:
        tracker.progress(state.step)
    model.train()

    def run_eval() -> None:
        if state.evals and state.evals[-1]["step"] == state.step:
            return  # an epoch end that eval_every already covered
        metrics = evaluate_paused()
        state.evals.append({"step": state.step, "epoch": state.epoch, **metrics})
        tracker.scalars(state.step, {k: metrics[k] for k in ("accuracy", "f1", "loss", "ece")}, "eval/")
        tracker.message(f"step {state.step}: eval accuracy {metrics['accuracy']:.4f}  f1 {metrics['f1']:.4f}")
        if cfg.keep_best and (state.best is None or metrics["accuracy"] > state.best["accuracy"]):
            state.best = state.evals[-1]
            hooks.keep_best(state)

    def evaluate_paused() -> dict:
        clock.pause()
        try:
            return hooks.evaluate()
        finally:
            clock.start()

    def save() -> None:
        clock.pause()
        state.window = window.tolist()
        hooks.checkpoint(state)
        clock.start()

    clock.start()
    while state.step < n_steps:
        plan = train_steps(data.lengths, cfg.batch_size, cfg.grad_accum, state.epoch, seed, dist.world,
                           dist.rank, cfg.group_by_length)
        epoch_len = len(plan)
        plan = plan[state.step_in_epoch: state.step_in_epoch + n_steps - state.step]
        batches = prefetch([collate(data, idx, pad_id, pad_left) for idx in micro] for micro in plan)
        for micro in batches:
            examples = sum(len(b["labels"]) for b in micro) * dist.world  # in the whole global step
            for m, batch in enumerate(micro):
                labels = batch["labels"].to(dist.device, non_blocking=True)
                with dist.grad_sync(model, sync=m == len(micro) - 1):
                    with precision.autocast():
                        logits = model(**model_inputs(batch, dist.device)).logits
                    loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
                    # sum over every example of the global step / their count; DDP and FSDP
                    # average gradients over ranks, hence the factor world
                    precision.backward(loss_sum * (dist.world / examples))
                window[0] += loss_sum.detach()
                window[1] += len(labels)
                mask = batch["attention_mask"]
                clock.add(len(mask), int(mask.sum()), mask.numel())
            precision.unscale(optimizer)
            norm = grad_norm_and_clip(params, cfg.max_grad_norm)
            # the norm is global (all ranks' gradients), so every rank takes the same branch;
            # fp16's scaler skips such steps itself
            if precision.scaler is None and not torch.isfinite(norm):
                raise StopTraining(f"step {state.step + 1}: loss or gradients are not finite "
                                   f"(grad norm {float(norm)}); weights were not updated")
            if not precision.step(optimizer):
                state.skipped_steps += 1
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.step_in_epoch += 1

            if state.step % cfg.log_every == 0 or state.step == n_steps:
                totals = dist.all_reduce_sum(window.clone())
                state.final_loss = float(totals[0] / max(totals[1], 1))
                rate = clock.summary()
                tracker.scalars(state.step, {
                    "train/loss": state.final_loss, "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(norm), "train/samples_per_s": rate["samples_per_s"] * dist.world,
                    "train/tokens_per_s": rate["real_tokens_per_s"] * dist.world,
                    "train/padding_share": rate["padding_share"],
                })
                tracker.progress(state.step - logged_at, loss=state.final_loss,
                                 samples_s=rate["samples_per_s"] * dist.world)
                logged_at = state.step
                window.zero_()
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                run_eval()
            at_epoch_end = state.step_in_epoch == epoch_len
            if checkpoint_every and state.step % checkpoint_every == 0 and not at_epoch_end:
                save()
            if hooks.stop_requested():
                save()
                raise StopTraining(f"stopped by a signal at step {state.step}")
        state.epoch += 1
        state.step_in_epoch = 0
        run_eval()  # at each epoch end, and at the last step
        save()
    clock.pause()
    rate = clock.summary()
    # each rank counted its own share: the global rate is their sum
    summed = dist.all_reduce_sum(torch.tensor(
        [rate["samples"], rate["samples_per_s"], rate["real_tokens_per_s"], rate["padded_tokens_per_s"]],
        dtype=torch.float64, device=dist.device))
    throughput = {
        "steps": state.step, "steps_per_epoch": steps_per_epoch, "train_seconds": rate["train_seconds"],
        "samples": int(summed[0]), "samples_per_s": float(summed[1]),
        "real_tokens_per_s": float(summed[2]), "padded_tokens_per_s": float(summed[3]),
        "padding_share": rate["padding_share"], "skipped_steps": state.skipped_steps,
    }
    return state, throughput
