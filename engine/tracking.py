"""What a run reports while it trains: TensorBoard events, JSON lines, a console progress bar.

Only the main rank writes; the others get a tracker that does nothing, so callers never branch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm


class Tracker:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int):
        self.enabled = enabled
        self.tb = self.jsonl = self.bar = None
        self.done, self.total = 0, total_steps
        if not enabled:
            return
        out = Path(out_dir)
        self.tb = SummaryWriter(str(out / "tb"))
        self.jsonl = open(out / "log.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=None, file=sys.stderr)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        flat = {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        for k, v in flat.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **flat}) + "\n")
        self.jsonl.flush()

    def progress(self, steps: int, **shown) -> None:
        if not self.enabled:
            return
        self.bar.update(steps)
        self.done += steps
        text = {k: f"{v:.4g}" for k, v in shown.items()}
        if self.bar.disable:  # not a terminal (CI, a log file): a plain line instead of a bar
            print(f"step {self.done}/{self.total} " + " ".join(f"{k} {v}" for k, v in text.items()),
                  file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix(text, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.enabled:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.tb.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()
