"""What a finished run reports: `metrics.json` (written last: its presence means the run finished),
the TensorBoard hparams, and the terminal summary `launch/train.py` prints."""
from __future__ import annotations

import dataclasses
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine import checkpoint, metrics
from engine.paths import write_json_atomic
from engine.recipe_yaml import dump_recipe, to_dict

if TYPE_CHECKING:
    from engine.finetune import Run, RunData
    from engine.loop import LoopState

SLIM = ("accuracy", "accuracy_se", "f1", "loss", "ece", "n")


@dataclass
class Scores:
    """The reported figures: base/ and tuned/ as saved (on test with data.test_split), and the scores
    taken as they trained (the same ones unless the snapshots were scored again)."""
    base: dict
    tuned: dict
    as_trained: dict  # {"base": ..., "tuned": ...}
    rescored: bool  # QLoRA, or FSDP mixed precision: the training-time scores are not the saved weights'
    base_reused: bool  # an earlier run (or the checkpoint resumed from) scored this base


@dataclass
class Trained:
    """What the loop and the exports left."""
    state: LoopState
    throughput: dict
    peak: dict  # peak_memory_mb (the largest rank), peak_memory_of
    chosen: dict  # the eval kept as tuned/: step, epoch, metrics
    tuned_sha256: str
    base_sha256: str | None  # save_base's hash; None when resumed (base/ was saved by the first attempt)
    exported: dict | None  # adapters.export's facts (LoRA / QLoRA), else None


def peak_memory(dist) -> dict:
    """The largest rank's peak memory so far (every rank calls): allocated on the GPU, or resident
    (max RSS) on CPU."""
    if dist.device.type == "cuda":
        peak = {"peak_memory_mb": round(torch.cuda.max_memory_allocated(dist.device) / 2**20, 1),
                "peak_memory_of": "cuda max_memory_allocated"}
    else:  # ru_maxrss is in KiB on Linux; it covers the whole process, loading included
        peak = {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
                "peak_memory_of": "process max RSS"}
    peak["peak_memory_mb"] = max(dist.all_gather_object(peak["peak_memory_mb"]))
    return peak


def record_recipe(run: Run) -> None:
    """output_dir/recipe.yaml: the recipe as asked (auto stays auto; metrics.json says what ran),
    written once the run goes ahead, so a refused resume leaves the run's own. An extended finished
    run is unfinished from here: its metrics.json goes (main rank)."""
    if run.dist.is_main:
        asked = dataclasses.replace(run.recipe.train, precision=run.choice.requested)
        dump_recipe(dataclasses.replace(run.recipe, train=asked), run.out / "recipe.yaml")
        if run.resumed and run.resumed.finished:
            (run.out / "metrics.json").unlink(missing_ok=True)


def build(run: Run, data: RunData, scores: Scores, trained: Trained, counts: dict, attention: str) -> dict:
    """metrics.json's content (main rank)."""
    out, state, splits = run.out, trained.state, data.splits
    report = {
        "base": {**scores.base,
                 "sha256": trained.base_sha256 or checkpoint.file_sha256(out / "base" / checkpoint.WEIGHTS),
                 "path": str(out / "base"),
                 # true: this base, eval set and settings were scored by an earlier run (or the
                 # checkpoint resumed from), and that score is reused instead of scoring again
                 "score_reused": scores.base_reused},
        "tuned": {**scores.tuned, "sha256": trained.tuned_sha256, "path": str(out / "tuned"),
                  "step": trained.chosen["step"], "epoch": trained.chosen["epoch"]},
        "train": train_section(run, trained),
        "params": counts,
        "model": {"name_or_path": run.recipe.model.name_or_path, "attn_implementation": attention},
        "evals": [{k: e[k] for k in ("step", "epoch", "accuracy", "f1", "loss", "ece")} for e in state.evals],
        "data": {"train": splits.train.origin, "eval": splits.eval.origin,
                 "train_n": len(data.train), "eval_n": len(data.eval), "labels": splits.label_names},
        "wall_seconds": round(run.parts.wall(), 1),
        "time_parts": run.parts.summary(),  # seconds: load, tokenize, base_eval, train, tuned_eval, save, other
    }
    if data.class_weights is not None:  # the loss's weight of each class, as trained
        report["train"]["class_weights"] = {"spec": run.recipe.train.class_weights, "weights": dict(
            zip(splits.label_names, map(float, data.class_weights), strict=True))}
    slim = {side: {k: m[k] for k in SLIM} for side, m in scores.as_trained.items()}
    method = run.recipe.peft.method
    if data.test is not None:  # base/tuned above are the test figures; these are the selection set's
        report["dev"] = slim
        report["data"].update(test=splits.test.origin, test_n=len(data.test))
    if scores.rescored and method != "qlora":  # FSDP mixed precision: the low-precision copies' figures
        report["as_trained"] = {"what": f"FSDP forward on {run.recipe.train.precision} copies of the weights, "
                                        f"on the {'dev' if data.test is not None else 'eval'} split", **slim}
    if method == "head":  # tuned/ is a plain snapshot; params says how much of the model trained
        report["peft"] = {"method": "head"}
    if trained.exported:
        report["peft"] = peft_section(run, trained.exported)
        if method == "qlora":  # the 4-bit model as it trained, before and after (on dev with a test split)
            report["peft"]["quantized"] = slim
    return report


def train_section(run: Run, trained: Trained) -> dict:
    # a resumed process timed only the steps it ran: the rates are over those, and say so
    timed = metrics.timed_steps(trained.throughput, run.resumed.step if run.resumed else 0)
    return {**timed, "final_loss": trained.state.final_loss, "world_size": run.dist.world,
            "strategy": run.dist.strategy, **run.choice.as_dict(),
            "threads_per_process": torch.get_num_threads(), "resumed_from": str(run.resume_from or ""),
            # the keys this resume changed (engine/config.py lets them): {key: [before, now]}
            "resume_changes": {k: list(v) for k, v in run.resumed.changes.items()} if run.resumed else {},
            "select_metric": run.recipe.train.select_metric, "stopped_early": trained.state.stopped_early,
            **trained.peak}


def peft_section(run: Run, exported: dict) -> dict:
    p = run.recipe.peft
    return {"method": p.method, "r": p.r, "alpha": p.alpha, "dropout": p.dropout,
            "target_modules": exported["target_modules"], "modules_to_save": exported["modules_to_save"],
            "adapter": {"path": str(run.out / "adapter"), "sha256": exported["adapter_sha256"]}}


def write(run: Run, report: dict, tracker) -> None:
    """The hparams to TensorBoard, then metrics.json, last (main rank)."""
    tracker.hparams(flat(to_dict(run.recipe)), {"accuracy": report["tuned"]["accuracy"],
                                                "f1": report["tuned"]["f1"]})
    tracker.final({f"{side}/{k}": report[side][k] for side in ("base", "tuned") for k in SLIM},
                  report["train"]["steps"])
    tracker.close()
    write_json_atomic(run.out / "metrics.json", report)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summary_table(report: dict) -> str:
    rows = [("", "base", "tuned")]
    for key, label in (("accuracy", "accuracy"), ("accuracy_se", "  std. error"), ("f1", "f1"), ("loss", "loss"),
                       ("ece", "ece")):
        rows.append((label, f"{report['base'][key]:.4f}", f"{report['tuned'][key]:.4f}"))
    rows.append(("n", str(report["base"]["n"]), str(report["tuned"]["n"])))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)) for r in rows]
    t = report["train"]
    lines.append(f"train: {throughput_line(t)}; whole run {report['wall_seconds']:.0f}s; "
                 f"peak memory {t['peak_memory_mb']:.0f} MB")
    if "peft" in report:
        p, c = report["peft"], report["params"]
        adapter = f"; adapter: {p['adapter']['path']}" if "adapter" in p else ""
        lines.append(f"{p['method']}: {c['trainable_params']:,} of {c['total_params']:,} parameters trained "
                     f"({c['trainable_share']:.2%}){adapter}")
    return "\n".join(lines)


def throughput_line(t: dict) -> str:
    """The rates over the steps this process timed, saying which when it resumed a run."""
    at, timed = t["resumed_at_step"], t["steps_timed"]
    if not timed:
        return f"resumed at step {at} of {t['steps']}: no step left to train, so no throughput"
    rates = (f"{t['samples_per_s']:.1f} samples/s, {t['real_tokens_per_s']:.0f} tokens/s "
             f"(padding {t['padding_share']:.1%})")
    if not at:
        return f"{rates}, {t['steps']} steps in {t['train_seconds']:.0f}s"
    return f"{rates} over the {timed} steps timed in {t['train_seconds']:.0f}s (resumed at step {at} of {t['steps']})"
