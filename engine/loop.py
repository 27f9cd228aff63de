"""The training loop: micro-batches -> loss -> backward -> clip -> step -> schedule, plus eval hooks.

One loop for every strategy: DDP, FSDP and PEFT change how the model is wrapped (engine/
distributed.py, engine/peft.py), never these lines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine.config import TrainConfig
from engine.data import Tokenized, collate, prefetch, train_steps
from engine.metrics import Throughput


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (every parameter under 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:  # one fused kernel per step instead of a dozen per tensor
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):  # fused is not offered for every device and tensor type
        return torch.optim.AdamW(groups, lr=cfg.lr)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to lr, then linear decay to 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
class LoopResult:
    steps: int = 0
    epochs_seen: int = 0
    final_loss: float = float("nan")
    evals: list = field(default_factory=list)  # {"step", "epoch", **metrics}
    best: Optional[dict] = None  # the eval whose state became tuned/ when keep_best
    best_state: Optional[dict] = None  # full weights of that state (rank 0)
    throughput: dict = field(default_factory=dict)


def train(model, optimizer, scheduler, data: Tokenized, cfg: TrainConfig, precision, dist, *,
          seed: int, pad_id: int, pad_left: bool, evaluate: Callable[[], dict], tracker) -> LoopResult:
    steps_per_epoch, n_steps = total_steps(len(data), cfg, dist.world)
    params = [p for p in model.parameters() if p.requires_grad]
    result = LoopResult()
    clock = Throughput()
    window = torch.zeros(2, dtype=torch.float64, device=dist.device)  # loss sum, examples: no sync per step
    step, epoch = 0, 0
    model.train()

    def run_eval() -> None:
        if result.evals and result.evals[-1]["step"] == step:
            return  # an epoch end that eval_every already covered
        clock.pause()
        metrics = evaluate()
        record = {"step": step, "epoch": epoch, **metrics}
        result.evals.append(record)
        tracker.scalars(step, {k: metrics[k] for k in ("accuracy", "f1", "loss", "ece")}, "eval/")
        tracker.message(f"step {step}: eval accuracy {metrics['accuracy']:.4f}  f1 {metrics['f1']:.4f}")
        if cfg.keep_best and (result.best is None or metrics["accuracy"] > result.best["accuracy"]):
            result.best = record
            result.best_state = dist.full_state_dict(model)
        clock.start()

    clock.start()
    while step < n_steps:
        plan = train_steps(data.lengths, cfg.batch_size, cfg.grad_accum, epoch, seed, dist.world,
                           dist.rank, cfg.group_by_length)[: n_steps - step]
        batches = prefetch([collate(data, idx, pad_id, pad_left) for idx in micro] for micro in plan)
        for micro in batches:
            examples = sum(len(b["labels"]) for b in micro) * dist.world  # in the whole global step
            for m, batch in enumerate(micro):
                batch = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items()}
                with dist.grad_sync(model, sync=m == len(micro) - 1):
                    with precision.autocast():
                        logits = model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).logits
                    loss_sum = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                    # sum over every example of the global step / their count; DDP and FSDP
                    # average gradients over ranks, hence the factor world
                    precision.backward(loss_sum * (dist.world / examples))
                window[0] += loss_sum.detach()
                window[1] += len(batch["labels"])
                mask = micro[m]["attention_mask"]
                clock.add(len(mask), int(mask.sum()), mask.numel())
            precision.unscale(optimizer)
            norm = grad_norm_and_clip(params, cfg.max_grad_norm)
            precision.step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % cfg.log_every == 0 or step == n_steps:
                totals = dist.all_reduce_sum(window.clone())
                result.final_loss = float(totals[0] / max(totals[1], 1))
                rate = clock.summary()
                tracker.scalars(step, {
                    "train/loss": result.final_loss, "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(norm), "train/samples_per_s": rate["samples_per_s"] * dist.world,
                    "train/tokens_per_s": rate["real_tokens_per_s"] * dist.world,
                    "train/padding_share": rate["padding_share"],
                })
                tracker.progress(step - result.steps, loss=result.final_loss,
                                 samples_s=rate["samples_per_s"] * dist.world)
                result.steps = step
                window.zero_()
            if cfg.eval_every and step % cfg.eval_every == 0:
                run_eval()
        epoch += 1
        run_eval()  # at each epoch end, and at the last step
    clock.pause()
    result.steps, result.epochs_seen = step, epoch
    rate = clock.summary()
    # each rank counted its own share: the global rate is their sum
    summed = dist.all_reduce_sum(torch.tensor(
        [rate["samples"], rate["samples_per_s"], rate["real_tokens_per_s"], rate["padded_tokens_per_s"]],
        dtype=torch.float64, device=dist.device))
    result.throughput = {
        "steps": step, "steps_per_epoch": steps_per_epoch, "train_seconds": rate["train_seconds"],
        "samples": int(summed[0]), "samples_per_s": float(summed[1]),
        "real_tokens_per_s": float(summed[2]), "padded_tokens_per_s": float(summed[3]),
        "padding_share": rate["padding_share"],
    }
    return result
