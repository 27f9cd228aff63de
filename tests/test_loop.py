import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import faults, run_cli, tiny_overrides
from engine.finetune import finetune
from engine.recipe_yaml import load_recipe


def _train(tiny_bert, tiny_data, out, *extra):
    recipe = load_recipe(None, tiny_overrides(tiny_bert, tiny_data, out) + list(extra))
    return finetune(recipe)


def test_accumulation_matches_one_big_batch(tiny_bert, tiny_data, tmp_path):
    """grad_accum 4 x batch 2 updates the weights exactly as 1 x batch 8 (loss over all 8 examples)."""
    _train(tiny_bert, tiny_data, tmp_path / "big", "train.batch_size=8", "train.grad_accum=1", "train.max_steps=4")
    _train(tiny_bert, tiny_data, tmp_path / "acc", "train.batch_size=2", "train.grad_accum=4", "train.max_steps=4")
    big = load_file(tmp_path / "big" / "tuned" / "model.safetensors")
    acc = load_file(tmp_path / "acc" / "tuned" / "model.safetensors")
    init = load_file(tmp_path / "big" / "base" / "model.safetensors")
    assert any(not torch.equal(big[k], init[k]) for k in big)  # it did train
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=0, atol=1e-6, msg=k)


def test_fp16_scaler_skips_overflow_steps():
    from engine.precision import Precision
    prec = Precision("fp16", torch.device("cpu"))
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    prec.backward((p * float("inf")).sum())
    prec.unscale(opt)
    prec.step(opt)
    assert torch.equal(p.detach(), torch.ones(2))  # the overflowing update was not applied
    opt.zero_grad()
    prec.backward(p.sum())
    prec.unscale(opt)
    prec.step(opt)
    assert not torch.equal(p.detach(), torch.ones(2))


def test_bf16_on_a_gpu_without_bf16_stops_with_one_line(monkeypatch):
    from engine.errors import RecipeError
    from engine.precision import Precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(RecipeError, match="Tesla T4 has no bf16 units.*train.precision=fp16 or fp32"):
        Precision("bf16", torch.device("cuda", 0))
    assert Precision("bf16", torch.device("cpu")).dtype == torch.bfloat16  # never refused on a CPU


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tiny_bert, tiny_data, tmp_path, precision):
    report = _train(tiny_bert, tiny_data, tmp_path / precision, f"train.precision={precision}", "train.epochs=4")
    assert report["tuned"]["accuracy"] > report["base"]["accuracy"]
    assert report["train"]["precision"] == precision


def _batch(n: int, seed: int) -> dict:
    """n rows of the tiny vocabulary's word ids between [CLS] and [SEP], and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (n, 10), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def _tiny_classifier(tiny_bert):
    from engine import modeling
    from engine.config import ModelConfig
    return modeling.load_model(ModelConfig(name_or_path=tiny_bert), ["neg", "pos"]).train()


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                         ("fp16", torch.float16)])
def test_training_forward_runs_under_the_recipes_autocast(tiny_bert, name, dtype):
    """train.precision=bf16/fp16: every micro-batch's forward computes in that dtype (autocast works on
    any CPU, native or emulated), while the weights stay the fp32 master copy."""
    from engine.config import TrainConfig
    from engine.distributed import Dist
    from engine.guard import StepGuard
    from engine.loop import LoopState, train_step
    from engine.optim import build_optimizer, build_schedule
    from engine.precision import Precision
    model = _tiny_classifier(tiny_bert)
    seen = []
    model.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cfg = TrainConfig(batch_size=4, grad_accum=2)
    opt = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    prec = Precision(name, torch.device("cpu"))
    assert (prec.scaler is not None) == (name == "fp16")  # bf16's range needs no loss scaling
    state = LoopState()
    train_step(model, opt, build_schedule(opt, cfg, 1), [_batch(4, 0), _batch(4, 1)], params, cfg,
               prec, Dist(), state, torch.zeros(2, dtype=torch.float64), StepGuard(stops=name != "fp16"))
    assert seen == [dtype, dtype]
    # one step taken, counted in the run and in the epoch (where a resume starts), gradients cleared
    assert (state.step, state.step_in_epoch) == (1, 1) and all(p.grad is None for p in params)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_sync_only_on_the_last_micro_batch(tiny_bert, strategy):
    """Accumulation micro-batches skip the gradient all-reduce (DDP's no_sync, FSDP's
    set_requires_gradient_sync(False)); the last one syncs, once per optimizer step."""
    import contextlib

    from engine.distributed import Dist
    from engine.loop import forward_backward
    from engine.precision import Precision

    class Wrapped(torch.nn.Module):  # the two strategies' switches, as seen from outside
        def __init__(self, module):
            super().__init__()
            self.module, self.sync, self.synced = module, True, []

        @contextlib.contextmanager
        def no_sync(self):
            self.sync = False
            yield
            self.sync = True

        def set_requires_gradient_sync(self, sync):
            self.sync = sync

        def forward(self, **kw):
            self.synced.append(self.sync)
            return self.module(**kw)

    model = Wrapped(_tiny_classifier(tiny_bert))
    forward_backward(model, [_batch(2, s) for s in range(3)], Precision("fp32", torch.device("cpu")),
                     Dist(strategy=strategy), torch.zeros(2, dtype=torch.float64))
    assert model.synced == [False, False, True]


def test_clipping_brings_the_global_norm_down_to_max_grad_norm():
    from engine.distributed import Dist
    from engine.loop import grad_norm_and_clip
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    assert float(grad_norm_and_clip([a, b], 1.0, Dist())) == pytest.approx(5.0)  # the norm before clipping
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(1.0)
    assert float(grad_norm_and_clip([a, b], 0.0, Dist())) == pytest.approx(1.0)  # 0: never clipped
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(1.0)


def test_fp16_clips_and_reports_the_true_gradient_norm_not_the_scaled_one(tiny_bert):
    """The loss scaler multiplies gradients by 65536: they must be unscaled before the norm."""
    from engine.config import TrainConfig
    from engine.distributed import Dist
    from engine.guard import StepGuard
    from engine.loop import LoopState, train_step
    from engine.optim import build_optimizer, build_schedule
    from engine.precision import Precision
    norms = {}
    for name in ("fp32", "fp16"):
        model = _tiny_classifier(tiny_bert)
        cfg = TrainConfig(batch_size=4, max_grad_norm=0.0)
        opt = build_optimizer(model, cfg)
        norms[name] = float(train_step(model, opt, build_schedule(opt, cfg, 1), [_batch(4, 0)],
                                       [p for p in model.parameters() if p.requires_grad], cfg,
                                       Precision(name, torch.device("cpu")), Dist(), LoopState(),
                                       torch.zeros(2, dtype=torch.float64), StepGuard(stops=True)))
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05)


def test_the_loss_window_sums_losses_and_counts_examples(tiny_bert):
    import torch.nn.functional as F

    from engine.distributed import Dist
    from engine.loop import forward_backward
    from engine.precision import Precision
    model = _tiny_classifier(tiny_bert)
    micro = [_batch(2, s) for s in range(3)]
    window = torch.zeros(2, dtype=torch.float64)
    forward_backward(model, micro, Precision("fp32", torch.device("cpu")), Dist(), window)
    with torch.no_grad():
        want = sum(float(F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                         b["labels"], reduction="sum")) for b in micro)
    assert float(window[1]) == 6 and float(window[0]) == pytest.approx(want, rel=1e-5)


class _Tracker:
    def __init__(self):
        self.rows = []

    def scalars(self, step, values, prefix=""):
        self.rows.append((step, {prefix + k: v for k, v in values.items()}))

    def progress(self, steps, **shown):
        pass

    def message(self, text):
        pass


def _books(cfg, evaluate=lambda: {}, keep_best=lambda state: None):
    from engine.distributed import Dist
    from engine.loop import Bookkeeping, Hooks, LoopState
    return Bookkeeping(LoopState(), cfg, Dist(), Hooks(evaluate=evaluate, keep_best=keep_best), _Tracker(), 0)


def test_each_logged_loss_covers_the_steps_since_the_last_log_and_the_last_step_is_logged():
    from engine.config import TrainConfig
    books = _books(TrainConfig(log_every=2))
    losses = {}
    for step, (loss_sum, n) in enumerate([(4.0, 2), (2.0, 2), (3.0, 3), (3.0, 3), (1.0, 4)], 1):
        books.window += torch.tensor([loss_sum, n], dtype=torch.float64)
        books.state.step = step
        books.after_step(torch.tensor(1.0), 0.1, n_steps=5, at_epoch_end=False)
    losses = {step: row["train/loss"] for step, row in books.tracker.rows}
    assert losses == {2: pytest.approx(1.5), 4: pytest.approx(1.0), 5: pytest.approx(0.25)}


def test_keep_best_keeps_the_first_of_equal_evals():
    from engine.config import TrainConfig
    scores = iter([0.5, 0.7, 0.7, 0.6])
    kept = []
    books = _books(TrainConfig(keep_best=True), keep_best=lambda state: kept.append(state.step),
                   evaluate=lambda: {"accuracy": next(scores), "f1": 0.0, "loss": 0.0, "ece": 0.0})
    for step in range(1, 5):
        books.state.step = step
        books.evaluate()
    assert kept == [1, 2] and books.state.best["step"] == 2


def test_each_epoch_trains_on_a_new_shuffle(tiny_bert, tiny_data, tmp_path, monkeypatch):
    from engine import loop
    orders = []
    real = loop.train_steps

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        orders.append(tuple(int(i) for micro in plan for batch in micro for i in batch))
        return plan
    monkeypatch.setattr(loop, "train_steps", spy)
    _train(tiny_bert, tiny_data, tmp_path / "run", "train.batch_size=32", "train.epochs=3")
    assert len(orders) == 3 and len(set(orders)) == 3  # three epochs, three orders
    assert len(set(orders[0])) == 192  # each one every example once


def test_a_non_finite_gradient_changes_no_weight_and_stops_at_the_next_read(tiny_bert):
    """The step takes no decision on the host: the update is skipped on the device (weights and AdamW's
    state as they were), and the read of the next log, eval or checkpoint stops the run naming the step."""
    from engine.config import TrainConfig
    from engine.distributed import Dist
    from engine.errors import StopTraining
    from engine.guard import StepGuard
    from engine.loop import LoopState, train_step
    from engine.optim import build_optimizer, build_schedule
    from engine.precision import Precision
    model = _tiny_classifier(tiny_bert)
    cfg = TrainConfig(batch_size=4)
    opt = build_optimizer(model, cfg)
    sched, state, guard = build_schedule(opt, cfg, 3), LoopState(), StepGuard(stops=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(seed):
        return train_step(model, opt, sched, [_batch(4, seed)], params, cfg, Precision("fp32", torch.device("cpu")),
                          Dist(), state, torch.zeros(2, dtype=torch.float64), guard)

    step(0)  # a good step: AdamW has state now
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[model.classifier.weight].items()}
    with torch.no_grad():
        model.classifier.bias[0] = float("nan")
    step(1)
    with torch.no_grad():
        model.classifier.bias[0] = before["classifier.bias"][0]
    step(2)  # finite again: still no update, the run stops at the read with step 1's weights
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(v, opt.state[model.classifier.weight][k]) for k, v in moments.items())
    assert guard.read() == (1, 2, pytest.approx(float("nan"), nan_ok=True))
    books = _books(TrainConfig())
    books.guard, books.state = guard, state
    with pytest.raises(StopTraining, match=r"step 2: loss or gradients are not finite .* those of step 1"):
        books.settle()


def test_fp16_counts_exactly_the_steps_its_scaler_skipped(tiny_bert):
    from engine.config import TrainConfig
    from engine.distributed import Dist
    from engine.guard import StepGuard
    from engine.loop import LoopState, train_step
    from engine.optim import build_optimizer, build_schedule
    from engine.precision import Precision
    model = _tiny_classifier(tiny_bert)
    overflow = [False, False, True]  # popped from the end: the first of 3 steps overflows, as fp16 does at times
    model.classifier.weight.register_hook(lambda g: g * float("inf") if overflow.pop() else g)
    cfg = TrainConfig(batch_size=4)
    opt = build_optimizer(model, cfg)
    sched, prec, state = build_schedule(opt, cfg, 3), Precision("fp16", torch.device("cpu")), LoopState()
    guard = StepGuard(stops=False)
    params = [p for p in model.parameters() if p.requires_grad]
    for s in range(3):
        train_step(model, opt, sched, [_batch(4, s)], params, cfg, prec, Dist(), state,
                   torch.zeros(2, dtype=torch.float64), guard)
    books = _books(TrainConfig())
    books.guard, books.state = guard, state
    books.settle()  # fp16 goes on: the skipped steps are counted where the loop reads
    assert (state.step, state.skipped_steps) == (3, 1)
    books.settle()
    assert state.skipped_steps == 1  # each skipped step counted once


def _tokens(n=64, seed=0):
    from engine.batching import Tokenized
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[2], rng.integers(5, 30, size=int(rng.integers(2, 20))), [3]]) for _ in range(n)]
    return Tokenized(ids, np.arange(n) % 2)


def _loop_run(tiny_bert, max_steps, poison_step=None, total=8):
    """loop.train on the tiny model, the schedule sized for `total` steps; the loss of step `poison_step`
    NaN. Returns (model, optimizer, the StopTraining raised or None)."""
    from engine.config import TrainConfig
    from engine.distributed import Dist
    from engine.errors import StopTraining
    from engine.loop import Hooks, train
    from engine.optim import build_optimizer, build_schedule
    from engine.precision import Precision
    torch.manual_seed(0)  # two runs start from the same weights
    model = _tiny_classifier(tiny_bert)
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == poison_step else output

    model.classifier.register_forward_hook(poison)
    cfg = TrainConfig(batch_size=4, max_steps=max_steps, log_every=4, lr=1e-3)
    opt = build_optimizer(model, cfg)
    sched = build_schedule(opt, TrainConfig(batch_size=4, max_steps=total), total)
    hooks = Hooks(evaluate=lambda: {"accuracy": 0.5, "f1": 0.5, "loss": 0.7, "ece": 0.0})
    try:
        train(model, opt, sched, _tokens(), cfg, Precision("fp32", torch.device("cpu")), Dist(), seed=0, pad_id=0,
              pad_left=False, hooks=hooks, tracker=_Tracker())
    except StopTraining as e:
        return model, opt, e
    return model, opt, None


def test_a_nan_at_step_k_stops_at_the_next_read_with_the_weights_of_step_k_minus_1(tiny_bert):
    """NaN at step 3, reads every 4 steps: the run goes on to step 4 (no read in between), stops there
    naming step 3, and holds exactly the weights and AdamW state of a run stopped after step 2."""
    model, opt, stop = _loop_run(tiny_bert, 8, poison_step=3)
    assert stop is not None and str(stop).startswith("step 3: loss or gradients are not finite")
    assert "steps 3-4" in str(stop)
    ref, ref_opt, none = _loop_run(tiny_bert, 2)
    assert none is None
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert all(torch.equal(opt.state[a][k], ref_opt.state[b][k]) for k in ("step", "exp_avg", "exp_avg_sq")), name


def test_a_nan_stops_the_run_at_the_next_log_and_writes_no_metrics(tiny_bert_dropout, tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run_cli("launch/train.py", "--recipe", "/dev/null", *tiny_overrides(tiny_bert_dropout, tiny_data, out),
                "train.log_every=4", "checkpoint.every=5", "checkpoint.keep=3", env=faults(nan_at_step=6))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert "step 6: loss or gradients are not finite" in last and "(1 non-finite step(s) in steps 6-8" in last
    assert "the last checkpoint is" in last and last.rstrip().endswith("step-5; continue with: --resume auto")
    assert not (out / "metrics.json").exists() and not (out / "tuned").exists()
    assert sorted(d.name for d in (out / "checkpoints").iterdir() if d.name.startswith("step-")) == ["step-5"]


def test_small_uniform_class_weights_log_the_plain_mean_loss(tiny_bert, tiny_data, tmp_path):
    """Issue 29 finding 7: the logged loss is the weighted mean, sum of w x loss over sum of w, whatever
    the weights' size: uniform weights of 0.001 log what an unweighted run logs (not / max(sum w, 1))."""
    plain = _train(tiny_bert, tiny_data, tmp_path / "plain", "train.max_steps=4")
    small = _train(tiny_bert, tiny_data, tmp_path / "small", "train.max_steps=4", "train.class_weights=[0.001, 0.001]")

    def logged(out):
        rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    assert len(logged(tmp_path / "plain")) == 2 and 0.3 < logged(tmp_path / "plain")[0] < 2
    assert logged(tmp_path / "small") == pytest.approx(logged(tmp_path / "plain"), rel=1e-5)
    assert small["train"]["final_loss"] == pytest.approx(plain["train"]["final_loss"], rel=1e-5)
