"""Fault injection for tests, loaded by Python at start-up when this folder is on PYTHONPATH.

FAULT_RANK          only this rank misbehaves (default: every process)
FAULT_KILL_AT_STEP  SIGKILL itself just before optimizer step N (1-based)
FAULT_TERM_AT_STEP  send itself SIGTERM just before optimizer step N
FAULT_NAN_AT_STEP   the loss of optimizer step N is NaN
FAULT_KILL_IN_SAVE  SIGKILL itself inside the N-th safetensors file write
FAULT_RAISE_AT_STEP raise RuntimeError just before optimizer step N
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
