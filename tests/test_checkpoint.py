"""What a checkpoint holds and what a resume checks, on a two-layer model in milliseconds (the runs that
are killed and resumed end to end are in tests/test_resume.py)."""
import dataclasses

import pytest
import torch

from engine import checkpoint
from engine.config import load_recipe
from engine.distributed import Dist
from engine.errors import CheckpointError
from engine.optim import lr_schedule
from engine.precision import Precision
from engine.resume import check_fingerprint, run_fingerprint


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


# every recipe key that decides the data order, the examples or the lr of a step, with another value
CHANGES = {
    "seed": "seed=7", "batch_size": "train.batch_size=4", "grad_accum": "train.grad_accum=2",
    "max_length": "data.max_length=16", "truncation": "data.truncation=tail", "schedule": "train.schedule=cosine",
    "min_lr_ratio": "train.min_lr_ratio=0.1", "warmup_ratio": "train.warmup_ratio=0.2",
    "test_split": "data.test_split=validation", "model": "model.name_or_path=another",
}


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_a_resume_with_another_recipe_is_refused_naming_the_key(tmp_path, key):
    base = ["model.name_or_path=m", "data.source=d", f"output_dir={tmp_path}"]
    model = torch.nn.Linear(2, 2)
    then = run_fingerprint(load_recipe(None, base), model, 100, 10, Dist())
    now = run_fingerprint(load_recipe(None, base + [CHANGES[key]]), model, 100, 10, Dist())
    with pytest.raises(CheckpointError, match=f"written by a different run \\({key} was"):
        check_fingerprint(tmp_path, then, now)
    check_fingerprint(tmp_path, then, dict(then))  # the same recipe resumes


def test_the_fingerprint_sees_the_weights_shapes_and_the_split_sizes(tmp_path):
    recipe = load_recipe(None, ["model.name_or_path=m", "data.source=d", f"output_dir={tmp_path}"])
    then = run_fingerprint(recipe, torch.nn.Linear(2, 2), 100, 10, Dist())
    for now in (run_fingerprint(recipe, torch.nn.Linear(2, 3), 100, 10, Dist()),
                run_fingerprint(recipe, torch.nn.Linear(2, 2), 99, 10, Dist()),
                run_fingerprint(recipe, torch.nn.Linear(2, 2), 100, 10, dataclasses.replace(Dist(), world=2))):
        with pytest.raises(CheckpointError, match="written by a different run"):
            check_fingerprint(tmp_path, then, now)


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path):
    from engine.resume import prepare_output_dir
    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-5" / "state.json").write_text("{}")
    for folder in ("tuned", "adapter", "tb"):
        (tmp_path / folder).mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "log.jsonl").write_text("{}\n")
    assert prepare_output_dir(tmp_path, overwrite=True, resume="auto", dist=Dist()) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_finished_or_unfinished_run_is_not_started_over_by_accident(tmp_path):
    from engine.errors import OutputDirError
    from engine.resume import prepare_output_dir
    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-5" / "state.json").write_text("{}")
    with pytest.raises(OutputDirError, match="holds checkpoints of an unfinished run"):
        prepare_output_dir(tmp_path, overwrite=False, resume=None, dist=Dist())
    assert prepare_output_dir(tmp_path, overwrite=False, resume="auto", dist=Dist()).name == "step-5"
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(OutputDirError, match="holds a finished run"):
        prepare_output_dir(tmp_path, overwrite=False, resume="auto", dist=Dist())
