"""The mutation drill: plant small, realistic bugs in the engine's core, one at a time, and check the
tests that cover the module catch each.

    .venv/bin/python tests/mutations.py              # every mutant; writes tests/mutations-report.{md,json}
    .venv/bin/python tests/mutations.py --list       # the mutants, and whether each snippet still matches
    .venv/bin/python tests/mutations.py --only NAME [--only NAME2 ...]   # a subset (report written too)

Each mutant is data: (name, file, the exact original snippet, its replacement, what bug it plants).
The snippet must occur exactly once in the file: when the code moves under it the drill says
"snippet not found" for that mutant and goes on, so the table is easy to re-check after a merge.

Mutants are applied in a scratch copy of the repository's files (git's tracked and untracked-but-
not-ignored files), never in the working tree. For each one the module's pytest selection runs with
-x (the first failing test stops it) under a timeout; the report says which test caught it, or that
it survived. A mutant marked `equivalent` carries the reason no test can tell it from the real code.

Not a pytest module (its name does not start with test_): pytest never collects it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "tests" / "mutations-report"

# The tests that cover each module, fastest first: -x stops at the first failure, so a caught mutant
# costs little and only a survivor runs the whole selection.
SELECTIONS = {
    "loop": ["tests/test_loop.py::test_training_forward_runs_under_the_recipes_autocast",
             "tests/test_loop.py::test_gradient_sync_only_on_the_last_micro_batch",
             "tests/test_loop.py::test_clipping_brings_the_global_norm_down_to_max_grad_norm",
             "tests/test_loop.py::test_a_non_finite_gradient_changes_no_weight_and_stops_at_the_next_read",
             "tests/test_loop.py::test_a_nan_at_step_k_stops_at_the_next_read_with_the_weights_of_step_k_minus_1",
             "tests/test_loop.py::test_small_uniform_class_weights_log_the_plain_mean_loss",
             "tests/test_loop.py::test_fp16_counts_exactly_the_steps_its_scaler_skipped",
             "tests/test_loop.py::test_the_loss_window_sums_losses_and_counts_examples",
             "tests/test_loop.py::test_each_logged_loss_covers_the_steps_since_the_last_log_and_the_last_step_is_logged",
             "tests/test_loop.py::test_keep_best_keeps_the_first_of_equal_evals",
             "tests/test_loop.py::test_accumulation_matches_one_big_batch",
             "tests/test_optim.py::test_each_step_runs_with_the_scheduled_lr",
             "tests/test_optim.py::test_recipe_schedule_drives_the_run",
             "tests/test_loop.py::test_each_epoch_trains_on_a_new_shuffle",
             "tests/test_resume.py", "tests/test_finetune.py", "tests/test_loop.py"],
    "precision": ["tests/test_precision.py", "tests/test_loop.py::test_fp16_scaler_skips_overflow_steps",
                  "tests/test_loop.py::test_training_forward_runs_under_the_recipes_autocast",
                  "tests/test_loop.py::test_fp16_clips_and_reports_the_true_gradient_norm_not_the_scaled_one",
                  "tests/test_evaluation.py::test_predict_builds_no_graph",
                  "tests/test_resume.py::test_fp16_scaler_skips_the_nan_step_and_finishes",
                  "tests/test_finetune.py::test_auto_precision_runs_what_the_probe_chose_and_says_so",
                  "tests/test_loop.py"],
    "optim": ["tests/test_optim.py"],
    "checkpoint": ["tests/test_checkpoint.py", "tests/test_resume.py", "tests/test_finetune.py"],
    "resume": ["tests/test_resume_keys.py", "tests/test_checkpoint.py", "tests/test_resume_recipe.py",
               "tests/test_resume.py", "tests/test_finetune.py"],
    "batching": ["tests/test_batching.py", "tests/test_batching_truncation.py",
                 "tests/test_buckets.py::test_a_batch_pads_to_the_smallest_bucket_that_holds_it",
                 "tests/test_loop.py::test_accumulation_matches_one_big_batch",
                 "tests/test_decoders.py::test_padded_in_a_batch_or_alone_gives_the_same_logits",
                 "tests/test_resume.py::test_sigkill_mid_epoch_then_resume_is_bit_identical",
                 "tests/test_finetune.py"],
    "evaluation": ["tests/test_evaluation.py", "tests/test_metrics.py", "tests/test_finetune.py"],
    "metrics": ["tests/test_metrics.py", "tests/test_evaluation.py",
                "tests/test_finetune.py::test_metrics_json_has_the_time_parts_and_the_chosen_precision",
                "tests/test_finetune.py"],
    "distributed": ["tests/test_distributed.py", "tests/test_loop.py::test_gradient_sync_only_on_the_last_micro_batch",
                    "tests/test_evaluation.py"],
    "reads": ["tests/test_step_reads.py"],  # a read back per step: only the read counter sees it
    # only 2-process runs can see a collective go missing: minutes, so only for the mutants that need it
    "distributed-runs": ["tests/distributed/test_ddp_fsdp.py::test_same_loss_curve_and_weights_as_one_process"],
    "adapters": ["tests/test_adapters.py::test_the_recipes_lora_settings_reach_peft",
                 "tests/test_adapters.py::test_defaults_per_architecture_and_all_linear_keeps_the_head_whole",
                 "tests/test_adapters.py::test_quantization_config_follows_precision_and_strategy",
                 "tests/test_adapters.py::test_bad_targets_stop_with_one_line",
                 "tests/test_adapters.py::test_lora_round_trip_and_head",
                 "tests/test_adapters.py::test_adapter_files_and_pipeline",
                 "tests/test_adapters.py::test_trainable_share",
                 "tests/test_adapters.py::test_qlora_round_trip_and_frozen_4bit_body",
                 "tests/test_adapters.py::test_qlora_metrics_are_those_of_the_snapshots",
                 "tests/test_adapters.py::test_qlora_keeps_activation_checkpointing",
                 "tests/test_adapters.py::test_killed_then_resumed_is_bit_identical"],
}


@dataclass
class Mutant:
    name: str
    file: str  # under engine/
    original: str  # must occur exactly once
    replacement: str
    bug: str  # the bug it plants, as a user would meet it
    tests: str = ""  # a SELECTIONS key; default: the file's module
    equivalent: str = ""  # why no test can tell it from the real code (then it does not count)

    @property
    def selection(self) -> list[str]:
        return SELECTIONS[self.tests or self.file.removesuffix(".py")]


M = Mutant
MUTANTS = [
    # ---- loop.py ------------------------------------------------------------------------------
    M("loop-autocast-removed", "loop.py",
      "            with precision.autocast():\n                logits = model(",
      "            if True:\n                logits = model(",
      "bf16/fp16 recipes train in fp32: the forward no longer runs under autocast"),
    M("loop-loss-per-micro-batch", "loop.py",
      "precision.backward(loss_sum * scale)",
      "precision.backward(loss_sum / len(labels))",
      "the loss is averaged per micro-batch: accumulation scales the gradient by grad_accum"),
    M("loop-loss-without-dp-world", "loop.py",
      "scale = dist.dp_world / examples",
      "scale = 1 / examples",
      "the DDP/FSDP gradient average is divided again by the world size: lr / world in effect",
      tests="distributed-runs"),
    M("loop-sync-every-micro-batch", "loop.py",
      "sync=m == len(micro) - 1", "sync=True",
      "every accumulation micro-batch all-reduces its gradients (no_sync never used)"),
    M("loop-scheduler-not-stepped", "loop.py",
      "    scheduler.step()\n    optimizer.zero_grad", "    optimizer.zero_grad",
      "the lr schedule never advances: warm-up's first lr for the whole run"),
    M("loop-no-zero-grad", "loop.py",
      "    optimizer.zero_grad(set_to_none=True)\n", "",
      "gradients of every earlier step pile up into the next"),
    M("loop-clip-never", "loop.py",
      "    if max_norm > 0:\n        torch.nn.utils.clip_grads_with_norm_",
      "    if max_norm < 0:\n        torch.nn.utils.clip_grads_with_norm_",
      "train.max_grad_norm is ignored: gradients are never clipped"),
    M("loop-nonfinite-not-stopped", "loop.py",
      "if count and self.guard.stops:", "if count and not self.guard.stops:",
      "a NaN loss in fp32/bf16 freezes the weights and the run goes on instead of stopping"),
    M("loop-skipped-steps-inverted", "guard.py",
      "            self.books[0] += bad\n            return None",
      "            self.books[0] += 1 - bad\n            return None",
      "fp16's skipped-step count counts the steps taken instead", tests="loop"),
    M("guard-not-sticky", "guard.py",
      "return (self.books[0] > 0).float()", "return bad.float()",
      "the steps after a non-finite one update the weights before the read stops the run", tests="loop"),
    M("loop-logged-loss-floor-one", "loop.py",
      'state.final_loss = loss_sum / weight if weight > 0 else float("nan")',
      "state.final_loss = loss_sum / max(weight, 1)",
      "small class weights shrink the logged train loss (issue 29 finding 7)"),
    M("loop-step-in-epoch-not-counted", "loop.py",
      "    state.step_in_epoch += 1\n", "",
      "the data position is not kept: a resume repeats the epoch's first steps"),
    M("loop-resume-slice-off-by-one", "loop.py",
      "plan = plan[state.step_in_epoch: state.step_in_epoch + n_steps - state.step]",
      "plan = plan[state.step_in_epoch + 1: state.step_in_epoch + n_steps - state.step]",
      "off by one in the data position: each epoch (and each resume) skips a step's examples"),
    M("loop-same-order-every-epoch", "loop.py",
      "cfg.grad_accum, state.epoch, seed", "cfg.grad_accum, 0, seed",
      "every epoch sees the examples in the same order"),
    M("loop-loss-per-batch-not-example", "loop.py",
      "        window[1] += len(labels)", "        window[1] += 1",
      "the logged train loss is a sum over each batch, not a mean over examples"),
    M("loop-window-not-reset", "loop.py",
      "        self.logged_at = state.step\n        self.window.zero_()",
      "        self.logged_at = state.step",
      "each logged train loss averages over the whole run so far, not since the last log"),
    M("loop-last-step-not-logged", "loop.py",
      "log = state.step % cfg.log_every == 0 or state.step == n_steps",
      "log = state.step % cfg.log_every == 0",
      "the final loss is not logged when the run's length is not a multiple of log_every"),
    M("loop-checkpoint-off-by-one", "loop.py",
      "state.step % self.checkpoint_every == 0 and not at_epoch_end",
      "(state.step + 1) % self.checkpoint_every == 0 and not at_epoch_end",
      "checkpoint.every=5 saves at steps 4, 9, ... instead of 5, 10"),
    M("loop-signal-no-save", "loop.py",
      "        if self.hooks.stop_requested():\n            self.save()\n",
      "        if self.hooks.stop_requested():\n",
      "SIGTERM stops the run without writing a checkpoint"),
    M("loop-keep-best-on-ties", "loop.py",
      'else metrics[metric] > best[metric]', 'else metrics[metric] >= best[metric]',
      "keep_best replaces the best with a later eval that only ties it"),
    # ---- precision.py -------------------------------------------------------------------------
    M("precision-autocast-null", "precision.py",
      "        return torch.autocast(self.device_type, dtype=self.dtype)",
      "        return contextlib.nullcontext()",
      "Precision.autocast never casts: bf16/fp16 train and evaluate in fp32"),
    M("precision-no-unscale", "precision.py",
      "        if self.scaler:\n            self.scaler.unscale_(optimizer)",
      "        if False:\n            self.scaler.unscale_(optimizer)",
      "fp16 gradients are clipped (and their norm logged) while still multiplied by the loss scale"),
    M("precision-scaler-for-bf16", "precision.py",
      'if name == "fp16" else None', 'if name != "fp32" else None',
      "bf16 gets a loss scaler it does not need (skips steps, scales the loss)"),
    M("precision-scale-never-updated", "precision.py",
      "            self.scaler.step(optimizer)\n            self.scaler.update()",
      "            self.scaler.step(optimizer)\n",
      "the fp16 loss scale never backs off after an overflow (nor grows)"),
    M("precision-found-inf-dropped", "precision.py",
      "optimizer.found_inf = skip\n", "optimizer.found_inf = skip * 0\n",
      "fused AdamW is never told to skip: a non-finite step goes into the weights"),
    M("precision-skip-read-on-host", "precision.py",
      '        elif optimizer.defaults.get("fused"):', "        elif False:",
      "the skip flag is read on the host every step although fused AdamW takes it on the device",
      tests="reads"),
    M("precision-auto-at-parity", "precision.py",
      "        if ratio >= NATIVE_RATIO:", "        if ratio >= 1.0:",
      "auto picks bf16 on a CPU where bf16 is barely as fast as fp32"),
    M("precision-ratio-inverted", "precision.py",
      'ratio = measure("fp32", threads) / measure(low, threads)',
      'ratio = measure(low, threads) / measure("fp32", threads)',
      "the probe's ratio is upside down: auto picks bf16 where it is emulated, fp32 where native"),
    M("precision-gpu-auto-bf16-always", "precision.py",
      '"bf16" if native else "fp32", None, why', '"bf16", None, why',
      "auto picks bf16 on a GPU without bf16 units"),
    M("precision-cache-ignores-threads", "precision.py",
      '|threads {threads}|{low}"', '|{low}"',
      "the probe's cached ratio is reused at another thread count, where bf16 may not pay"),
    # ---- optim.py -----------------------------------------------------------------------------
    M("optim-decay-on-norms", "optim.py",
      "(decay if p.ndim >= 2 else no_decay)", "(decay if p.ndim >= 1 else no_decay)",
      "weight decay applied to biases and LayerNorm weights"),
    M("optim-no-decay-group-decays", "optim.py",
      '{"params": no_decay, "weight_decay": 0.0}', '{"params": no_decay, "weight_decay": cfg.weight_decay}',
      "the no-decay group decays too"),
    M("optim-warmup-starts-at-zero", "optim.py",
      "return (step + 1) / (warmup_steps + 1)", "return step / warmup_steps",
      "warm-up off by one: the first step runs at lr 0 (wasted)"),
    M("optim-warmup-one-step-long", "optim.py",
      "if step < warmup_steps:", "if step <= warmup_steps:",
      "warm-up off by one: one step too many",
      equivalent="at step == warmup_steps the warm-up gives (w + 1) / (w + 1) = 1 and the decay "
                 "(total - w) / (total - w) = 1: the same lr at every step"),
    M("optim-warmup-peaks-early", "optim.py",
      "return (step + 1) / (warmup_steps + 1)", "return (step + 1) / warmup_steps",
      "warm-up off by one: full lr one step early, the warm-up's steps all too high"),
    M("optim-decay-denominator", "optim.py",
      "max(1, total_steps - warmup_steps)", "max(1, total_steps)",
      "the decay ignores warm-up: it starts below lr and never reaches the floor"),
    M("optim-cosine-sign", "optim.py",
      "0.5 * (1.0 + math.cos(math.pi * (1.0 - left)))", "0.5 * (1.0 - math.cos(math.pi * (1.0 - left)))",
      "cosine rises instead of decaying"),
    M("optim-min-lr-ignored", "optim.py",
      "return min_ratio + (1.0 - min_ratio) * decayed", "return decayed",
      "train.min_lr_ratio is ignored: the lr decays to 0"),
    M("optim-constant-typo", "optim.py",
      'if shape == "constant":', 'if shape == "const":',
      "train.schedule=constant decays like cosine"),
    # ---- checkpoint.py ------------------------------------------------------------------------
    M("checkpoint-sorted-by-name", "checkpoint.py",
      "return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))",
      "return sorted(found, key=lambda p: p.name)",
      "checkpoints ordered as text: step-10 before step-5, so keep prunes the newest"),
    M("checkpoint-keep-count", "checkpoint.py",
      "for old in checkpoint_dirs(out_dir)[:-keep]:", "for old in checkpoint_dirs(out_dir)[:-keep - 1]:",
      "checkpoint.keep=2 keeps 3"),
    M("checkpoint-rng-not-restored", "checkpoint.py",
      '        set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))',
      '        json.loads(rng_file.read_text(encoding="utf-8"))',
      "a resume does not restore the RNGs: dropout masks differ from the uninterrupted run"),
    M("checkpoint-torch-rng-not-restored", "checkpoint.py",
      '    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))\n', "",
      "a resume restores python's and numpy's RNG but not torch's (dropout)"),
    M("checkpoint-scheduler-not-restored", "checkpoint.py",
      '    scheduler.load_state_dict(state["scheduler"])\n', "",
      "a resume restarts the lr schedule from its first step"),
    M("checkpoint-scaler-not-restored", "checkpoint.py",
      '        precision.scaler.load_state_dict(state["scaler"])', "        pass",
      "an fp16 resume restarts the loss scale at 65536"),
    M("checkpoint-shape-check-dropped", "checkpoint.py",
      "    if missing or any(tensors[k].shape != v.shape for k, v in expected.items()):",
      "    if missing:",
      "a checkpoint of another shape fails inside copy_ with a traceback, not one line"),
    M("checkpoint-world-size-unchecked", "checkpoint.py",
      '    if state.get("world_size") != dist.world:', "    if False:",
      "resuming with another number of processes is not refused"),
    M("checkpoint-stale-tmp-kept", "checkpoint.py",
      "            shutil.rmtree(stale, ignore_errors=True)", "            pass",
      "half-written checkpoint folders of killed saves are never cleaned up"),
    # ---- resume.py ----------------------------------------------------------------------------
    M("resume-auto-picks-oldest", "resume.py",
      "resume_from = Path(existing[-1]) if existing else None", "resume_from = Path(existing[0]) if existing else None",
      "--resume auto continues from the oldest checkpoint"),
    M("resume-auto-not-broadcast", "resume.py",
      "dist.broadcast_object(\n        _look(out, resume) if dist.is_main else None)", "(\n        _look(out, resume))",
      "each rank lists the checkpoints itself: ranks may resume different ones"),
    M("resume-fixed-key-accepted", "resume.py",
      "        if decided.get(key) in (FIXED, None):", "        if decided.get(key) is None:",
      "a resume with another lr, label order or batch size trains on, recording a recipe that did not run"),
    M("resume-undecided-key-accepted", "resume.py",
      "        if decided.get(key) in (FIXED, None):", "        if decided.get(key) == FIXED:",
      "a key added without a resume decision may change on resume (default-allow)"),
    M("resume-facts-ignore-processes", "resume.py",
      '"processes": dist.world, ', "",
      "a resume with another number of processes passes the fingerprint"),
    M("resume-no-steps-left-accepted", "resume.py",
      "        if now <= at:", "        if now < at:",
      "a resume whose new length leaves no step to train reports a stale eval as tuned/"),
    M("resume-lr-not-rebuilt", "resume.py",
      "        after = optim.follow_schedule(scheduler)[0]", "        after = before",
      "a run extended at resume takes its next step with the old schedule's lr"),
    M("optim-follow-schedule-not-set", "optim.py",
      '        group["lr"] = lr\n', "        pass\n",
      "a run extended at resume says the lr follows the new schedule, but its next step uses the old one's",
      tests="resume"),
    M("resume-overwrite-keeps-checkpoints", "resume.py",
      'STAGING, checkpoint.CHECKPOINTS, "log.jsonl"', 'STAGING, "log.jsonl"',
      "--overwrite leaves the old run's checkpoints, which --resume auto later picks"),
    M("resume-unfinished-not-refused", "resume.py",
      "    if not resume and existing:\n        raise OutputDirError", "    if False:\n        raise OutputDirError",
      "a new run starts in a folder holding an unfinished run's checkpoints"),
    M("resume-finished-not-refused", "resume.py",
      "    if finished and resume_from is None:\n        raise OutputDirError",
      "    if False:\n        raise OutputDirError",
      "a new run overwrites a finished run without --overwrite"),
    M("resume-finished-resumed-unchanged", "resume.py",
      "    if finished and not any(k in changes for k in LENGTH_KEYS):", "    if False:",
      "--resume on a finished run with the same length trains nothing and reports it again"),
    # ---- batching.py --------------------------------------------------------------------------
    M("batching-shard-overlap", "batching.py",
      "micro = [group[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size]",
      "micro = [group[(m + rank) * batch_size:(m + rank + 1) * batch_size]",
      "with accumulation, ranks' micro-batches overlap: some examples train twice a step, others never"),
    M("batching-shard-order", "batching.py",
      "micro = [group[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size]",
      "micro = [group[(rank * grad_accum + m) * batch_size:(rank * grad_accum + m + 1) * batch_size]",
      "ranks take their micro-batches of a step in another order",
      equivalent="a step's examples are the same and disjoint across ranks, its loss is their sum: only the "
                 "order of the floating-point sum changes (and which micro-batch pads with which)"),
    M("batching-epoch-not-in-seed", "batching.py",
      "rng = np.random.default_rng([seed, epoch])", "rng = np.random.default_rng(seed)",
      "every epoch shuffles the same way"),
    M("batching-groups-not-shuffled", "batching.py",
      "groups = order.reshape(n_steps, step)[rng.permutation(n_steps)]",
      "groups = order.reshape(n_steps, step)",
      "length grouping feeds each window's batches longest first, not shuffled"),
    M("batching-bucket-side", "batching.py",
      "np.searchsorted(buckets, longest)", 'np.searchsorted(buckets, longest, side="right")',
      "a batch exactly a bucket long pads to the next bucket"),
    M("batching-pad-side", "batching.py",
      "        if pad_left:\n            input_ids[row, width - len(s):]",
      "        if not pad_left:\n            input_ids[row, width - len(s):]",
      "padding side swapped: decoders get right padding, encoders left"),
    M("batching-position-ids-off-by-one", "batching.py",
      "np.clip(mask.cumsum(axis=1) - 1, 0, None)", "np.clip(mask.cumsum(axis=1), 0, None)",
      "left-padded positions start at 1: a decoder's logits depend on the padding"),
    M("batching-labels-misaligned", "batching.py",
      '"labels": torch.from_numpy(data.labels[idx])', '"labels": torch.from_numpy(data.labels[:len(idx)])',
      "each batch gets the first labels of the dataset, not its own"),
    M("batching-cache-ignores-max-length", "batching.py",
      'digest.update(f"{max_length}|{truncation}|', 'digest.update(f"{truncation}|',
      "the token cache is reused after data.max_length changes"),
    M("batching-tail-off-by-one", "batching.py",
      "return body[:keep_head] + body[len(body) - (budget - keep_head):]",
      "return body[:keep_head] + body[len(body) - (budget - keep_head) + 1:]",
      "tail truncation keeps one token fewer than max_length allows"),
    # ---- evaluation.py ------------------------------------------------------------------------
    M("evaluation-gather-order", "evaluation.py",
      "            out[idx] = logits", "            out[np.sort(idx)] = logits",
      "gathered logits land in sorted-index order, not their examples' rows"),
    M("evaluation-autocast-removed", "evaluation.py",
      "        with precision.autocast():\n            logits = forward(",
      "        if True:\n            logits = forward(",
      "evaluation ignores the run's precision"),
    M("evaluation-train-mode-not-restored", "evaluation.py",
      "    model.train(was_training)\n", "",
      "an eval during training leaves dropout off for the rest of the run"),
    M("evaluation-graph-built", "evaluation.py",
      "    with dist.no_autograd():", "    if True:",
      "evaluation builds an autograd graph: memory for nothing"),
    M("evaluation-digest-ignores-labels", "evaluation.py",
      "    h.update(np.asarray(data.labels, dtype=np.int64).tobytes())\n", "",
      "a stored base score is reused for an eval set with other labels"),
    # ---- metrics.py ---------------------------------------------------------------------------
    M("metrics-ece-bin-edge", "metrics.py",
      "    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)\n    ece = 0.0",
      "    which = np.clip(np.digitize(conf, edges[1:-1], right=False), 0, bins - 1)\n    ece = 0.0",
      "ECE puts a confidence on a bin edge into the bin above"),
    M("metrics-ece-unweighted", "metrics.py",
      "ece += in_bin.mean() * abs(", "ece += abs(",
      "ECE sums the bins' gaps without weighting them by their share"),
    M("metrics-f1-weighted", "metrics.py",
      '"f1": float(f1[list(range(k)) if f1_classes is None else sorted(f1_classes)].mean()) if k else 0.0,',
      '"f1": float((f1 * actual).sum() / max(actual.sum(), 1)) if k else 0.0,',
      "F1 averaged weighted by support, not macro"),
    M("metrics-f1-present-classes", "metrics.py",
      "list(range(k)) if f1_classes is None", "np.flatnonzero(actual) if f1_classes is None",
      "macro-F1 averages only the classes present in the gold labels"),
    M("metrics-confusion-transposed", "metrics.py",
      "np.add.at(confusion, (labels, preds), 1)", "np.add.at(confusion, (preds, labels), 1)",
      "confusion matrix transposed: precision and recall swapped"),
    M("metrics-softmax-unstable", "metrics.py",
      "    z = logits - logits.max(axis=-1, keepdims=True)", "    z = logits",
      "softmax overflows on large logits: loss and ECE become NaN"),
    M("metrics-timed-from-zero", "metrics.py",
      '    timed = summary["steps"] - first_step', '    timed = summary["steps"]',
      "a resumed run reports all the run's steps as timed over the seconds of the part it ran"),
    M("metrics-padding-share-inverted", "metrics.py",
      "1 - self.real_tokens / self.padded_tokens", "self.real_tokens / self.padded_tokens",
      "the padding share reports the real-token share"),
    # ---- distributed.py -----------------------------------------------------------------------
    M("distributed-no-sync-dropped", "distributed.py",
      '        if self.strategy == "ddp" and not sync:', '        if False:',
      "DDP all-reduces every accumulation micro-batch (no_sync dropped)"),
    M("distributed-fsdp-always-syncs", "distributed.py",
      "            model.set_requires_gradient_sync(sync)", "            model.set_requires_gradient_sync(True)",
      "FSDP reduce-scatters every accumulation micro-batch"),
    M("distributed-dp-rank-zero", "distributed.py",
      "    def dp_rank(self) -> int:\n        return self.rank", "    def dp_rank(self) -> int:\n        return 0",
      "every rank trains on rank 0's examples"),
    M("distributed-eval-module-unwraps-fsdp", "distributed.py",
      'return self.unwrap(model) if self.strategy == "ddp" else model', "return self.unwrap(model)",
      "FSDP's eval forward bypasses the wrapper that gathers the shards"),
    M("distributed-inference-mode-under-fsdp", "distributed.py",
      'return torch.no_grad() if self.strategy == "fsdp" else torch.inference_mode()',
      "return torch.inference_mode()",
      "FSDP evaluates under inference_mode, which its forward breaks"),
    M("distributed-casts-without-precision", "distributed.py",
      'return self.strategy == "fsdp" and precision_dtype is not None', 'return self.strategy == "fsdp"',
      "fp32 FSDP runs are rescored as if they had trained on low-precision copies"),
    M("distributed-all-reduce-skipped", "distributed.py",
      "    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:\n        if self.active and self.world > 1:",
      "    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:\n        if False:",
      "the logged loss and throughput are rank 0's alone", tests="distributed-runs"),
    # ---- adapters.py --------------------------------------------------------------------------
    M("adapters-head-not-saved", "adapters.py",
      "        modules_to_save=head,", "        modules_to_save=None,",
      "the classification head is not trained or saved with the adapter"),
    M("adapters-lora-in-head", "adapters.py",
      "        exclude_modules=head,\n", "",
      "all-linear puts LoRA inside the classification head too"),
    M("adapters-unmerged-export", "adapters.py",
      "merged = fresh.merge_and_unload()", "merged = fresh.unload()",
      "tuned/ is base/ with the trained head: the adapter is dropped, not merged"),
    M("adapters-dropout-ignored", "adapters.py",
      "lora_dropout=cfg.dropout,", "lora_dropout=0.0,",
      "peft.dropout is ignored"),
    M("adapters-qlora-compute-fp32", "adapters.py",
      "compute = DTYPES[precision] or torch.float32", "compute = torch.float32",
      "QLoRA's 4-bit layers compute in fp32 whatever train.precision says"),
    M("adapters-avx512-repack", "adapters.py",
      "            module.support_avx512bf16_for_cpu = False", "            pass",
      "an eval on an AVX512-BF16 CPU repacks 4-bit weights into an inference-only layout"),
    M("adapters-target-suffix", "adapters.py",
      'n == t or n.endswith("." + t)', 'n == t or n.endswith(t)',
      "a target name matches any layer whose name ends with it (query matches subquery)"),
]


def locate(m: Mutant, root: Path) -> str | None:
    """None when the snippet occurs exactly once; else what is wrong."""
    text = (root / "engine" / m.file).read_text(encoding="utf-8")
    n = text.count(m.original)
    return None if n == 1 else ("snippet not found" if n == 0 else f"snippet found {n} times")


def scratch_copy() -> Path:
    """The repository's files (tracked, and untracked but not ignored) in a temporary folder."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    dest = Path(tempfile.mkdtemp(prefix="mutations-"))
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file() and not src.is_symlink():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def expand(copy: Path, selection: list[str]) -> list[str]:
    """The selection as test ids, in its order, each once. pytest merges a file with a test of it
    named earlier (the file's order wins), so the order is made explicit here."""
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *selection], cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)},
                       capture_output=True, text=True)
    found = [line for line in p.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if p.returncode != 0 or not found:
        sys.exit(f"cannot collect {selection}: {p.stdout[-500:]}{p.stderr[-500:]}")
    ordered: list[str] = []
    for entry in selection:
        for test in found:
            if (test == entry or test.startswith(entry + "::") or test.startswith(entry + "[")) \
                    and test not in ordered:
                ordered.append(test)
    return ordered


def run_selection(copy: Path, selection: list[str], timeout: float) -> tuple[str, str, float]:
    """(outcome, first failing test or detail, seconds); outcome: caught | survived | timeout | error."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header",
           "-W", "ignore", *selection]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # pytest and the training runs it started
        p.communicate()
        return "timeout", f"no verdict within {timeout:.0f} s", time.perf_counter() - t
    finally:
        if p.poll() is None:  # the drill itself was stopped
            os.killpg(p.pid, signal.SIGKILL)
    seconds = time.perf_counter() - t
    if p.returncode == 0:
        return "survived", "", seconds
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if p.returncode == 1 and first:
        return "caught", first.group(1), seconds
    tail = " | ".join((out + err).strip().splitlines()[-3:])
    return "error", f"pytest exit {p.returncode}: {tail[:300]}", seconds


def engine_is_the_copys(copy: Path) -> None:
    """The tests must import the mutated engine, not an installed one."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    where = subprocess.run([sys.executable, "-c", "import engine; print(engine.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        sys.exit(f"the scratch copy's tests import {where}, not the copy's engine/")


def current_commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = [line for line in subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                             capture_output=True, text=True).stdout.splitlines()
             if REPORT.name not in line]  # the report this drill writes is not a change to what it tests
    return commit + (" (uncommitted changes)" if dirty else "")


def merged_with_earlier(results: list[dict]) -> list[dict]:
    """--only --merge: this run's results replace those of the same mutants in the committed report;
    the others keep theirs (each row says when and at which commit it ran)."""
    try:
        earlier = {r["name"]: r for r in json.loads(REPORT.with_suffix(".json").read_text())["results"]}
    except (OSError, ValueError, KeyError):
        earlier = {}
    earlier.update({r["name"]: r for r in results})
    return [earlier[m.name] for m in MUTANTS if m.name in earlier]


def write_report(results: list[dict], started: str, wall: float, partial: bool) -> None:
    # whether a mutant is equivalent is a property of the mutant, not of the run: read from the table
    reasons = {m.name: m.equivalent for m in MUTANTS}
    results = [{**r, "equivalent": reasons.get(r["name"], r["equivalent"])} for r in results]
    commit = current_commit()
    load = Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "n/a"
    counted = [r for r in results if r["outcome"] in ("caught", "timeout", "survived")]
    caught = [r for r in counted if r["outcome"] != "survived"]
    equivalent = [r for r in results if r["outcome"] == "survived" and r["equivalent"]]
    scored = [r for r in counted if not (r["outcome"] == "survived" and r["equivalent"])]
    share = len(caught) / len(scored) if scored else 0.0
    runs = sorted({(r["date"], r["commit"]) for r in results})
    header = {"date": started, "commit": commit, "runs": [f"{d} at {c}" for d, c in runs],
              "loadavg_at_end": load, "cpus": os.cpu_count(), "wall_s": round(wall, 1),
              "mutant_seconds_total": round(sum(r["seconds"] for r in results), 1),
              "mutants": len(results), "caught": len(caught), "survived": len(scored) - len(caught),
              "equivalent": len(equivalent),
              "not_run": len(results) - len(counted), "caught_share": round(share, 4), "partial": partial}
    REPORT.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=1) + "\n")
    lines = ["# Mutation drill report", "",
             f"Written by `tests/mutations.py` on {started} at commit {header['commit']}; "
             f"load average at the end `{load}` on {os.cpu_count()} CPUs; {wall / 60:.1f} min in all; "
             f"the rows' pytest runs add up to {header['mutant_seconds_total'] / 60:.1f} min"
             + (" (a subset: --only)" if partial else "") + ".",
             *([f"Rows come from {len(runs)} runs: " + "; ".join(header["runs"]) + "."] if len(runs) > 1 else []),
             "",
             f"**{len(caught)} of {len(scored)} mutants caught ({share:.0%})**; {len(equivalent)} equivalent "
             f"(explained below, not counted); {header['not_run']} not run (snippet gone or pytest error).", "",
             "| mutant | file | bug planted | outcome | caught by | s |", "|---|---|---|---|---|---|"]
    for r in results:
        outcome = r["outcome"] + (" (equivalent)" if r["outcome"] == "survived" and r["equivalent"] else "")
        detail = r["caught_by"] or r["equivalent"] or r["detail"]
        lines.append(f"| {r['name']} | {r['file']} | {r['bug']} | {outcome} | {detail.replace('|', '/')} | "
                     f"{r['seconds']:.0f} |")
    REPORT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="run only this mutant (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and check their snippets")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: keep the other mutants' rows of the committed report")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant (default 300)")
    args = ap.parse_args()
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        sys.exit("duplicate mutant names")
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        sys.exit(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    # cheap selections first, the minutes-long 2-process runs last: a run cut short has done the most
    order = ["metrics", "optim", "precision", "distributed", "evaluation", "batching", "checkpoint", "resume",
             "loop", "reads", "adapters", "distributed-runs"]
    chosen.sort(key=lambda m: order.index(m.tests or m.file.removesuffix(".py")))
    if args.list:
        for m in chosen:
            print(f"{m.name:40} engine/{m.file:16} {locate(m, ROOT) or 'ok'}")
        return 0

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = current_commit()
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))  # still clean the copy up
    copy = scratch_copy()
    results: list[dict] = []
    expanded: dict[str, list[str]] = {}
    try:
        engine_is_the_copys(copy)
        for i, m in enumerate(chosen, 1):
            path = copy / "engine" / m.file
            pristine = path.read_text(encoding="utf-8")
            problem = locate(m, copy)
            if problem:
                outcome, detail, seconds = "not-run", f"{problem} in engine/{m.file}: update the mutant", 0.0
            else:
                path.write_text(pristine.replace(m.original, m.replacement), encoding="utf-8")
                try:
                    key = m.tests or m.file.removesuffix(".py")
                    if key not in expanded:  # collected on the unmutated copy
                        path.write_text(pristine, encoding="utf-8")
                        expanded[key] = expand(copy, m.selection)
                        path.write_text(pristine.replace(m.original, m.replacement), encoding="utf-8")
                    outcome, detail, seconds = run_selection(copy, expanded[key], args.timeout)
                finally:
                    path.write_text(pristine, encoding="utf-8")
            r = {**asdict(m), "date": started, "commit": commit, "outcome": outcome,
                 "caught_by": detail if outcome == "caught" else "",
                 "detail": "" if outcome == "caught" else detail, "seconds": round(seconds, 1)}
            del r["original"], r["replacement"]
            results.append(r)
            print(f"[{i}/{len(chosen)}] {m.name}: {outcome} {detail} ({seconds:.0f} s)", flush=True)
            rows = merged_with_earlier(results) if args.merge else results
            write_report(rows, started, time.perf_counter() - t0, len(rows) < len(MUTANTS) or i < len(chosen))
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
