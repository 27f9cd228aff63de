"""Resume is default-deny, checked key by key in milliseconds: every recipe key, read from the
dataclasses, has a resume decision in engine/config.py (`@on_resume`); every key that may not change
is refused naming it, the checkpoint's value and the new one; the others are honoured and reported.
A key added later is walked too, and fails here until it has a decision. The end-to-end resumes
are in tests/test_resume_recipe.py."""
import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import pytest
import torch

from engine import checkpoint, resume
from engine.config import FIXED, Recipe, TrainConfig
from engine.distributed import Dist
from engine.errors import CheckpointError, OutputDirError
from engine.optim import build_schedule, follow_schedule
from engine.recipe_yaml import load_recipe

RULES = resume.rules()
FIXED_KEYS = [k for k, why in RULES.items() if why in (FIXED, None)]  # no decision: may not change
MAY_CHANGE = [k for k, why in RULES.items() if why not in (FIXED, None)]

# keys whose other value needs another key set first, as the recipe's own rules ask
SETUP = {"data.holdout_size": ["data.eval_split=null", "data.holdout_size=5"],
         "data.test_size": ["data.test_split=validation"],
         "train.early_stopping_patience": ["train.keep_best=true"], "train.compile_mode": ["train.compile=true"]}
# keys whose type alone gives no other valid value
OTHER = {"data.encoding": "latin-1", "data.pad_buckets": [256, 512], "train.class_weights": "balanced",
         "distributed.backend": "gloo"}


def sections(schema=Recipe):
    """The recipe's dataclasses: Recipe and every section nested in it."""
    hints = typing.get_type_hints(schema)
    nested = [hints[f.name] for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name])]
    return [schema] + [s for n in nested for s in sections(n)]


def test_every_recipe_key_has_a_resume_decision():
    undecided = [k for k, why in RULES.items() if why is None]
    assert not undecided, (
        f"{', '.join(undecided)}: no resume decision. Add each to its section's @on_resume(...) in "
        f"engine/config.py: fixed=(...) when a resume must keep the checkpoint's value, or "
        f"may_change={{name: why}} when a resumed run may honour another value (engine/resume.py)")
    assert len(RULES) > 60 and "train.lr" in FIXED_KEYS and "train.log_every" in MAY_CHANGE


def test_no_decision_names_a_key_that_does_not_exist():
    for section in sections():
        stale = set(section.__dict__.get("RESUME", {})) - {f.name for f in dataclasses.fields(section)}
        assert not stale, f"{section.__name__}'s @on_resume names no key of it: {sorted(stale)}"


def _other(key: str, value):
    """Another valid value than `value` for `key`, from its type."""
    if key in OTHER:
        return OTHER[key]
    section, _, name = key.rpartition(".")
    schema = Recipe
    for part in filter(None, section.split(".")):
        schema = typing.get_type_hints(schema)[part]
    tp = typing.get_type_hints(schema)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return not value
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in typing.get_args(tp) if a != value)
    if tp is int:
        return (value or 4) + 1
    if tp is float:
        return value * 2 if value else 0.1
    if tp is str:
        return "other"
    if typing.get_origin(tp) is list:
        return ["x", "y"] if value is None else list(reversed(value))
    if typing.get_origin(tp) is dict:
        return {"x": "y"}
    raise AssertionError(f"{key}: add another value for it to OTHER in this test")


def _change(key: str, tmp_path: Path) -> tuple[dict, dict]:
    """(the recipe's values, the same recipe's values with `key` alone changed), as a checkpoint stores them."""
    base = [f"output_dir={tmp_path / 'run'}", *SETUP.get(key, [])]
    then = resume.recipe_values(load_recipe(None, base))
    now = resume.recipe_values(load_recipe(None, base + [f"{key}={json.dumps(_other(key, then[key]))}"]))
    assert [k for k in then if then[k] != now[k]] == [key]
    return then, now


@pytest.mark.parametrize("key", FIXED_KEYS)
def test_a_key_that_may_not_change_is_refused_naming_it_and_both_values(key, tmp_path):
    then, now = _change(key, tmp_path)
    with pytest.raises(CheckpointError) as refused:
        resume.check_recipe(tmp_path, then, now)
    message = str(refused.value)
    assert f"{key} was {then[key]!r} when this checkpoint was written, now {now[key]!r}" in message
    assert "\n" not in message


@pytest.mark.parametrize("key", MAY_CHANGE)
def test_a_key_that_may_change_is_honoured_and_reported(key, tmp_path):
    then, now = _change(key, tmp_path)
    assert resume.check_recipe(tmp_path, then, now) == {key: (then[key], now[key])}


def test_a_key_without_a_decision_may_not_change(tmp_path, monkeypatch):
    """Default-deny: a key added to a section without a decision is refused, not let through."""
    monkeypatch.setattr(TrainConfig, "RESUME", {k: v for k, v in TrainConfig.RESUME.items() if k != "log_every"})
    then, now = _change("train.log_every", tmp_path)
    with pytest.raises(CheckpointError, match="train.log_every was 10 when this checkpoint was written, now 11"):
        resume.check_recipe(tmp_path, then, now)


def test_a_key_the_checkpoint_predates_counts_as_its_default(tmp_path):
    then, now = _change("train.lr", tmp_path)
    del then["train.lr"]  # an older checkpoint without the key: the default (2e-5) ran
    with pytest.raises(CheckpointError, match="train.lr was 2e-05"):
        resume.check_recipe(tmp_path, then, now)
    assert resume.check_recipe(tmp_path, then, {**then, "train.lr": 2e-5}) == {}


# ---- the checkpoint as a run opens it ------------------------------------------------------------

FACTS = {"weight shapes (sha256)": "ab", "processes": 1, "strategy": "none", "classes": ["neg", "pos"],
         "train examples": 192, "eval examples": 33, "steps": 48}


def _checkpoint(out: Path, recipe, step: int = 8, **loop) -> Path:
    folder = out / checkpoint.CHECKPOINTS / f"step-{step}"
    folder.mkdir(parents=True)
    state = {"fingerprint": {"recipe": resume.recipe_values(recipe), "facts": FACTS},
             "loop": {"step": step, "epoch": 0, **loop}, "base_metrics": {"accuracy": 0.5}}
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def test_opening_a_checkpoint_checks_the_recipe_and_says_what_changed(tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(None, [f"output_dir={out}", "train.epochs=2"])
    folder = _checkpoint(out, recipe)
    said = []
    longer = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=4.0))
    resumed = resume.open_checkpoint(folder, out, False, longer, said.append)
    assert resumed.changes == {"train.epochs": (2.0, 4.0)} and said == ["resume: train.epochs 2.0 -> 4.0"]
    with pytest.raises(CheckpointError, match="train.lr was 2e-05 when this checkpoint was written, now 0.001"):
        resume.open_checkpoint(folder, out, False, dataclasses.replace(
            recipe, train=dataclasses.replace(recipe.train, lr=1e-3)), said.append)
    # a finished run continues only to train longer
    with pytest.raises(OutputDirError, match="holds a finished run .* only to train it longer"):
        resume.open_checkpoint(folder, out, True, recipe, said.append)
    assert resume.open_checkpoint(folder, out, True, longer, said.append).finished


def test_a_checkpoint_of_another_folder_or_an_older_engine_is_refused(tmp_path):
    recipe = load_recipe(None, [f"output_dir={tmp_path / 'run'}"])
    elsewhere = _checkpoint(tmp_path / "other", recipe)
    # base/ and the log are in the run's own folder: resumed elsewhere, the run would end without them
    with pytest.raises(CheckpointError, match="not a checkpoint of output_dir"):
        resume.open_checkpoint(elsewhere, tmp_path / "run", False, recipe, print)
    old = _checkpoint(tmp_path / "run", recipe)
    state = json.loads((old / "state.json").read_text())
    state["fingerprint"] = {"model": "m", "batch_size": 16}  # the fingerprint before every key was in it
    (old / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="written by an older version of this engine"):
        resume.open_checkpoint(old, tmp_path / "run", False, recipe, print)


def _resumed(tmp_path, finished=False, **loop) -> resume.Resumed:
    recipe = load_recipe(None, [f"output_dir={tmp_path}"])
    folder = _checkpoint(tmp_path, recipe, **loop)
    return resume.Resumed(folder, json.loads((folder / "state.json").read_text()), finished)


@pytest.mark.parametrize("fact, value", [("processes", 2), ("train examples", 191), ("classes", ["pos", "neg"]),
                                         ("weight shapes (sha256)", "cd")])
def test_another_model_data_or_process_count_is_refused_naming_it(tmp_path, fact, value):
    with pytest.raises(CheckpointError, match=f"{re.escape(fact)} was .* when this checkpoint was written, now"):
        resume.check_facts(_resumed(tmp_path), FACTS | {fact: value})
    resume.check_facts(_resumed(tmp_path / "same"), dict(FACTS))


def test_the_facts_are_the_weight_shapes_classes_sizes_length_and_processes():
    facts = resume.run_facts(torch.nn.Linear(2, 2), ["neg", "pos"], 192, 33, 48, Dist())
    assert set(facts) == set(FACTS) and facts["classes"] == ["neg", "pos"]
    assert (facts["train examples"], facts["eval examples"], facts["steps"], facts["processes"]) == (192, 33, 48, 1)
    wider = resume.run_facts(torch.nn.Linear(2, 3), ["neg", "pos"], 192, 33, 48, Dist())
    assert wider["weight shapes (sha256)"] != facts["weight shapes (sha256)"]
    assert resume.run_facts(torch.nn.Linear(2, 2), ["neg", "pos"], 192, 33, 48, Dist(world=2))["processes"] == 2


def test_a_new_length_must_leave_steps_to_train(tmp_path):
    longer = _resumed(tmp_path / "a")
    resume.check_facts(longer, FACTS | {"steps": 72})
    assert longer.steps == (48, 72)
    with pytest.raises(CheckpointError, match="takes 8 steps, and the checkpoint is at step 8"):
        resume.check_facts(_resumed(tmp_path / "b"), FACTS | {"steps": 8})
    with pytest.raises(CheckpointError, match="stopped early"):
        resume.check_facts(_resumed(tmp_path / "c", stopped_early=True), FACTS | {"steps": 72})
    with pytest.raises(OutputDirError, match="holds a finished run of 48 steps"):
        resume.check_facts(_resumed(tmp_path / "d", finished=True), dict(FACTS))


def test_the_lr_follows_the_schedule_rebuilt_over_the_new_length():
    """A resume that extends the run: the next step's lr is the new schedule's at that step, not the
    old schedule's value the checkpoint brought back."""
    cfg = TrainConfig(lr=1e-2)
    model = torch.nn.Linear(2, 2)
    old_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    old = build_schedule(old_opt, cfg, 48)
    for _ in range(8):
        old_opt.step()
        old.step()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    new = build_schedule(opt, cfg, 72)
    opt.load_state_dict(old_opt.state_dict())
    new.load_state_dict(old.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 40 / 48)  # what the checkpoint holds
    assert follow_schedule(new) == [pytest.approx(1e-2 * 64 / 72)]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 64 / 72)
    new.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 63 / 72)


class _Rank1(Dist):
    """Rank 1 of 2, whose broadcast hands it rank 0's answer."""

    def broadcast_object(self, obj):
        assert obj is None  # rank 1 sends nothing
        return self.rank0_view


def test_every_rank_resumes_the_checkpoint_rank_0_chose(tmp_path):
    """--resume auto: rank 1's own listing (a network filesystem's stale cache) shows step-5 only;
    it resumes rank 0's choice, step-10."""
    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-5" / "state.json").write_text("{}")
    rank1 = _Rank1(rank=1, world=2)
    rank1.rank0_view = (False, [str(tmp_path / "checkpoints" / "step-5"), str(tmp_path / "checkpoints" / "step-10")],
                        ["checkpoints"], False)
    assert resume.prepare_output_dir(tmp_path, False, "auto", rank1) == (tmp_path / "checkpoints" / "step-10", False)
