"""What a checkpoint holds and what a resume checks, on a two-layer model in milliseconds (the runs that
are killed and resumed end to end are in tests/test_resume.py)."""
import shutil

import pytest
import torch

from engine import checkpoint
from engine.distributed import Dist
from engine.errors import CheckpointError
from engine.optim import lr_schedule
from engine.precision import Precision


def _parts(scale: float = 65536.0, width: int = 4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = lr_schedule(opt, "linear", warmup_steps=2, total_steps=10)
    prec = Precision("fp16", torch.device("cpu"))
    prec.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    return model, opt, sched, prec


def _save(out, step, parts, keep=2):
    return checkpoint.save_training_state(out, step, *parts, Dist(), state={"loop": {"step": step}}, keep=keep)


def _train_a_step(model, opt, sched, prec):
    prec.backward(model(torch.ones(2, model[0].in_features)).sum())
    prec.unscale(opt)
    prec.step(opt)
    sched.step()
    opt.zero_grad()


def test_a_checkpoint_brings_back_weights_moments_schedule_scale_and_rngs(tmp_path):
    saved = _parts(scale=1024.0)
    for _ in range(3):
        _train_a_step(*saved)
    folder = _save(tmp_path, 3, saved)
    rng_then = torch.get_rng_state()
    torch.rand(5)  # the RNG moves on after the save
    fresh = _parts()
    checkpoint.load_training_state(folder, *fresh, Dist())
    model, opt, sched, prec = fresh
    for a, b in zip(saved[0].parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    moments = [opt.state[p]["exp_avg"] for p in model.parameters()]
    assert all(torch.equal(m, saved[1].state[p]["exp_avg"]) for m, p in zip(moments, saved[0].parameters(),
                                                                                 strict=True))
    assert sched.last_epoch == 3 and sched.get_last_lr() == saved[2].get_last_lr()
    assert prec.scaler.get_scale() == saved[3].scaler.get_scale() == 1024.0
    assert torch.equal(torch.get_rng_state(), rng_then)


def test_keep_holds_the_newest_by_step_number_and_clears_debris(tmp_path):
    parts = _parts()
    for step in (5, 10, 15):
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / f".step-{step}.tmp-dead").mkdir()  # a save that was killed
        _save(tmp_path, step, parts, keep=2)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-10", "step-15"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10", "step-15"]


def test_another_world_size_or_model_shape_is_refused_with_one_line(tmp_path):
    folder = _save(tmp_path, 1, _parts())
    with pytest.raises(CheckpointError, match="written by 1 processes, resumed with 2"):
        checkpoint.load_training_state(folder, *_parts(), Dist(world=2))
    with pytest.raises(CheckpointError, match=r"does not match this model \(model/0.weight\)"):
        checkpoint.load_training_state(folder, *_parts(width=5), Dist())


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path):
    from engine.resume import prepare_output_dir
    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-5" / "state.json").write_text("{}")
    for folder in ("tuned", "adapter", "tb"):
        (tmp_path / folder).mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "log.jsonl").write_text("{}\n")
    assert prepare_output_dir(tmp_path, overwrite=True, resume="auto", dist=Dist()) == (None, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_finished_or_unfinished_run_is_not_started_over_by_accident(tmp_path):
    from engine.errors import OutputDirError
    from engine.resume import prepare_output_dir
    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-5" / "state.json").write_text("{}")
    with pytest.raises(OutputDirError, match="holds checkpoints of an unfinished run"):
        prepare_output_dir(tmp_path, overwrite=False, resume=None, dist=Dist())
    assert prepare_output_dir(tmp_path, overwrite=False, resume="auto", dist=Dist()) == \
        (tmp_path / "checkpoints" / "step-5", False)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(OutputDirError, match="holds a finished run"):
        prepare_output_dir(tmp_path, overwrite=False, resume=None, dist=Dist())
    # a finished run with a checkpoint: only a resume that trains longer goes on (engine/resume.py
    # open_checkpoint), so the folder says it is finished
    assert prepare_output_dir(tmp_path, overwrite=False, resume="auto", dist=Dist())[1] is True
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(OutputDirError, match="holds a finished run"):
        prepare_output_dir(tmp_path, overwrite=False, resume="auto", dist=Dist())
