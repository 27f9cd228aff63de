"""Fault injection for tests, loaded by Python at start-up when this folder is on PYTHONPATH.

FAULT_RANK          only this rank misbehaves (default: every process)
FAULT_KILL_AT_STEP  SIGKILL itself just before optimizer step N (1-based)
FAULT_TERM_AT_STEP  send itself SIGTERM just before optimizer step N
FAULT_NAN_AT_STEP   the loss of optimizer step N is NaN
FAULT_KILL_IN_SAVE  SIGKILL itself inside the N-th safetensors file write
FAULT_RAISE_AT_STEP raise RuntimeError just before optimizer step N
FAULT_KILL_AT_LOAD   SIGKILL itself at the start of the N-th model load (from_pretrained)
FAULT_TERM_AT_LOAD   send itself SIGTERM at the start of the N-th model load
FAULT_TERM_PARENT_AT_LOAD  send its parent (torchrun) SIGTERM at the start of the N-th model load,
                    then wait up to 10 s for the SIGTERM torchrun passes on
FAULT_LOG_LOADS     append "rank path" to this file at each model load
FAULT_LOG_DROPOUT   append "rank bits" to this file: the first training dropout's first 256 mask bits
FAULT_OWN_DISK      this rank's output_dir=... becomes output_dir=...-<rank>: a node whose path
                    names a disk of its own instead of the shared one
FAULT_COMPILE_BACKEND  torch.compile's backend (eager: the same wrapper, no inductor build)
Only the first attempt of an elastic job misbehaves (TORCHELASTIC_RESTART_COUNT=0 or unset).
"""
import os
import signal

_rank = os.environ.get("FAULT_RANK")
_active = (_rank is None or _rank == os.environ.get("RANK", "0")) and \
    os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def _n(name):
    v = os.environ.get(name)
    return int(v) if v else None


if _active and any(_n(k) for k in ("FAULT_KILL_AT_STEP", "FAULT_TERM_AT_STEP", "FAULT_NAN_AT_STEP",
                                    "FAULT_KILL_IN_SAVE", "FAULT_RAISE_AT_STEP")):
    import torch
    import torch.nn.functional as F

    steps = [0]
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        steps[0] += 1
        if steps[0] == _n("FAULT_KILL_AT_STEP"):
            os.kill(os.getpid(), signal.SIGKILL)
        if steps[0] == _n("FAULT_TERM_AT_STEP"):
            os.kill(os.getpid(), signal.SIGTERM)
        if steps[0] == _n("FAULT_RAISE_AT_STEP"):
            raise RuntimeError("injected failure on this rank")
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = step
    real_ce = F.cross_entropy

    def cross_entropy(*a, **k):
        loss = real_ce(*a, **k)
        # the step about to be taken is steps[0] + 1; only training losses carry gradients
        if torch.is_grad_enabled() and steps[0] + 1 == _n("FAULT_NAN_AT_STEP"):
            loss = loss * float("nan")
        return loss

    F.cross_entropy = cross_entropy

    if _n("FAULT_KILL_IN_SAVE"):
        import safetensors.torch as st

        saves = [0]
        real_save = st.save_file

        def save_file(tensors, filename, *a, **k):
            saves[0] += 1
            if saves[0] == _n("FAULT_KILL_IN_SAVE"):
                with open(filename, "wb") as fh:  # a partial file, as a real crash leaves
                    fh.write(b"\x00" * 100)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(tensors, filename, *a, **k)

        st.save_file = save_file

if _active and (_n("FAULT_KILL_AT_LOAD") or _n("FAULT_TERM_AT_LOAD") or _n("FAULT_TERM_PARENT_AT_LOAD")
                or os.environ.get("FAULT_LOG_LOADS")):
    import transformers.modeling_utils as mu

    loads = [0]
    real_from_pretrained = mu.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, path, *a, **k):
        loads[0] += 1
        if os.environ.get("FAULT_LOG_LOADS"):
            with open(os.environ["FAULT_LOG_LOADS"], "a") as fh:
                fh.write(f"{os.environ.get('RANK', '0')} {path}\n")
        if loads[0] == _n("FAULT_KILL_AT_LOAD"):
            os.kill(os.getpid(), signal.SIGKILL)
        if loads[0] == _n("FAULT_TERM_AT_LOAD"):
            os.kill(os.getpid(), signal.SIGTERM)
        if loads[0] == _n("FAULT_TERM_PARENT_AT_LOAD"):
            import time

            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(10)
        return real_from_pretrained(cls, path, *a, **k)

    mu.PreTrainedModel.from_pretrained = classmethod(from_pretrained)

if _active and os.environ.get("FAULT_LOG_DROPOUT"):
    import torch
    import torch.nn.functional as F

    real_dropout = F.dropout
    logged = [False]

    def dropout(input, p=0.5, training=True, inplace=False):
        out = real_dropout(input, p, training, inplace)
        if training and p > 0 and not logged[0]:
            logged[0] = True
            bits = "".join("0" if v == 0 else "1" for v in out.detach().flatten()[:256].tolist())
            with open(os.environ["FAULT_LOG_DROPOUT"], "a") as fh:
                fh.write(f"{os.environ.get('RANK', '0')} {bits}\n")
        return out

    F.dropout = dropout

if _active and os.environ.get("FAULT_OWN_DISK"):
    import sys

    sys.argv = [f"{a}-{os.environ.get('RANK', '0')}" if a.startswith("output_dir=") else a for a in sys.argv]

if os.environ.get("FAULT_COMPILE_BACKEND"):
    import torch

    real_compile = torch.compile

    def compile(model=None, **k):
        return real_compile(model, **{**k, "backend": os.environ["FAULT_COMPILE_BACKEND"]})

    torch.compile = compile
