"""train.precision=auto: bf16 only where the hardware computes it natively, measured once per machine."""
import json

import pytest
import torch

from engine import precision
from engine.paths import user_cache_dir
from engine.recipe_yaml import load_recipe

CPU = torch.device("cpu")


def stub(fp32_s: float, low_s: float):
    """A probe that reports fixed matmul times, counting its calls."""
    calls = []

    def probe(name, threads):
        calls.append(name)
        return fp32_s if name == "fp32" else low_s
    return probe, calls


def test_auto_picks_bf16_on_a_cpu_that_computes_it_natively():
    probe, _ = stub(fp32_s=1.0, low_s=0.27)  # bf16 3.7x fp32, as on an AVX512-BF16 EPYC
    c = precision.choose("auto", CPU, probe=probe)
    assert (c.name, round(c.ratio, 2)) == ("bf16", 3.7)
    assert "3.70x" in c.describe()


def test_auto_picks_fp32_where_bf16_is_emulated():
    probe, _ = stub(fp32_s=1.0, low_s=5.0)  # bf16 0.2x fp32, as on a Xeon without AVX512-BF16
    c = precision.choose("auto", CPU, probe=probe)
    assert (c.name, c.ratio) == ("fp32", 0.2)
    assert c.as_dict() == {"precision": "fp32", "precision_requested": "auto", "precision_ratio": 0.2,
                           "precision_reason": c.reason}


def test_auto_needs_a_clear_gain_not_just_parity():
    probe, _ = stub(fp32_s=1.0, low_s=1.0 / 1.2)
    assert precision.choose("auto", CPU, probe=probe).name == "fp32"


def test_explicit_bf16_on_an_emulating_cpu_runs_but_says_how_slow(monkeypatch):
    probe, _ = stub(fp32_s=1.0, low_s=4.0)
    said = []
    c = precision.choose("bf16", CPU, say=said.append, probe=probe)
    assert c.name == "bf16"
    assert len(said) == 1 and "0.25x fp32" in said[0] and "4.0x slower" in said[0]
    monkeypatch.setattr(precision, "machine_id", lambda: "a CPU with bf16 units flags 0")
    fast, _ = stub(fp32_s=1.0, low_s=0.5)
    said.clear()
    assert precision.choose("bf16", CPU, say=said.append, probe=fast).name == "bf16" and said == []


def test_fp32_never_probes_and_auto_never_picks_fp16():
    probe, calls = stub(fp32_s=1.0, low_s=0.1)
    assert precision.choose("fp32", CPU, probe=probe).name == "fp32" and calls == []
    assert precision.choose("auto", CPU, probe=probe).name == "bf16"
    assert "fp16" not in calls


def test_the_probe_is_cached_per_machine_and_torch_version(monkeypatch):
    probe, calls = stub(fp32_s=1.0, low_s=0.5)
    assert precision.choose("auto", CPU, probe=probe).ratio == 2.0
    assert precision.choose("auto", CPU, probe=probe).ratio == 2.0
    assert calls == ["fp32", "bf16"]  # the second run read the cache
    saved = json.loads((user_cache_dir() / "precision_probe.json").read_text())
    assert list(saved.values()) == [2.0]
    monkeypatch.setattr(precision, "machine_id", lambda: "another CPU flags 0")
    assert precision.choose("auto", CPU, probe=probe).ratio == 2.0
    assert len(calls) == 4  # another CPU kind: measured again
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    precision.choose("auto", CPU, probe=probe)
    assert len(calls) == 6
    # bf16's gain depends on the thread count (torchrun ranks share the cores): measured again
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    precision.choose("auto", CPU, probe=probe)
    assert len(calls) == 8


def test_a_damaged_cache_is_measured_again():
    file = user_cache_dir() / "precision_probe.json"
    file.parent.mkdir(parents=True)
    file.write_text("{not json")
    probe, calls = stub(fp32_s=1.0, low_s=0.5)
    assert precision.choose("auto", CPU, probe=probe).name == "bf16" and len(calls) == 2
    assert json.loads(file.read_text())


def test_only_the_main_rank_probes_the_others_follow():
    probe, calls = stub(fp32_s=1.0, low_s=0.5)
    rank0 = precision.choose("auto", CPU, probe=probe, main=True)
    sent = rank0.ratio
    other = precision.choose("auto", CPU, broadcast=lambda mine: sent if mine is None else mine,
                             main=False, probe=probe)
    assert len(calls) == 2 and other == rank0


def test_the_real_probe_is_quick_and_positive():
    import time
    t = time.perf_counter()
    ratio = precision.cpu_ratio("bf16")
    assert ratio > 0 and time.perf_counter() - t < 5  # well under a second on an idle core


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_bf16_units(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    c = precision.choose("auto", torch.device("cuda", 0), probe=lambda *a: pytest.fail("probed a GPU"))
    assert c.name == expected and c.ratio is None


def test_auto_is_a_recipe_value_and_the_default_stays_fp32():
    assert load_recipe(None).train.precision == "fp32"  # exactness tests pin the default
    assert load_recipe(None, ["train.precision=auto"]).train.precision == "auto"
