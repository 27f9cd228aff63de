"""What every launch script shares: import path, argument parsing, quiet libraries, and exit codes
for bad input."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

# runnable from a checkout without `pip install -e .` (torchrun launch/train.py ...)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# our own loop: keep transformers from printing advice meant for its Trainer
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with bad arguments answered as any bad input is: one line on stderr, exit code 2."""

    def __init__(self, description: str):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def count(text: str) -> int:
    """An argparse type: a whole number from 1 to the recipes' bound (sizes, lengths, batches)."""
    from engine.config import MAX_INT  # light: no torch

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_INT}, got {value}")
    return value


def names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names (columns, classes), none of them empty."""
    parts = tuple(part.strip() for part in text.split(","))
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return parts


def encoding(text: str) -> str:
    """An argparse type: a text encoding Python knows (utf-8, latin-1, ...)."""
    import codecs

    try:
        codecs.lookup(text)
    except LookupError:
        raise argparse.ArgumentTypeError(f"not a known text encoding: {text!r}") from None
    return text


def reading_flags(p: argparse.ArgumentParser, precision_else: str) -> None:
    """The flags that say how texts are read and scored; each defaults to what the snapshot's run did
    (its run_settings.json), so predict and evaluate read a run's texts as the run read them."""
    p.add_argument("--max-length", type=count,
                   help="default: the run's data.max_length, else 512 (or the model's positions)")
    p.add_argument("--truncation", choices=["head", "tail", "head_tail"],
                   help="default: the run's data.truncation, else head")
    p.add_argument("--head-tokens", type=count, help="head_tail: default the run's data.head_tokens, else 128")
    p.add_argument("--batch-size", type=count, help="default: the run's train.eval_batch_size, else 64")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help=f"default: the precision the run scored in, else {precision_else}")


def quiet_libraries() -> None:
    """Our progress bar is the one that matters; hide the per-file load/save bars of transformers."""
    # here, not at the top: the environment line above must come first, and it costs a second
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load reports would bury our one-line errors


def run_main(main) -> None:
    """Run `main()`; bad input -> one line on stderr and exit 2; a crash -> traceback and exit 1."""
    from engine.errors import USER_ERRORS, StopTraining  # importable once sys.path holds the checkout

    rank = os.environ.get("RANK")
    who = f"rank {rank}: " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        quiet_libraries()
        code = main()
    except USER_ERRORS as e:
        if rank in (None, "0"):  # every rank meets the same bad input: say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:  # give rank 0 time to say it before torchrun, seeing this exit, stops the group
            time.sleep(3)
        os._exit(2)  # skip interpreter teardown: never hang on a half-joined process group
    except StopTraining as e:
        if rank in (None, "0"):
            print(f"stopped: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    except SystemExit:  # argparse's own usage errors (exit code 2) and explicit exits
        raise
    except KeyboardInterrupt:
        print(f"{who}interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    except BaseException as e:  # noqa: BLE001 - report which rank died, then die fast
        traceback.print_exc()
        print(f"{who}failed: {e.__class__.__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is written and closed by now; skipping interpreter teardown keeps a torch store
    # thread destroyed during it from aborting a finished run ("terminate called ...", code -6)
    os._exit(code or 0)
