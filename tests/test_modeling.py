"""Loading: the attention kernel that fits the architecture, and the class names a config gives."""
import json

import pandas as pd
import pytest

import tiny
from conftest import run_cli, tiny_overrides
from engine.config import ModelConfig
from engine.modeling import ModelError, attn_implementation, config_label_names, load_model, max_positions


@pytest.mark.parametrize("arch, expected", [("bert", "sdpa"), ("deberta-v2", "eager"), ("mpnet", "eager")])
def test_auto_takes_sdpa_where_the_architecture_has_it(tmp_path, arch, expected):
    model = load_model(ModelConfig(name_or_path=tiny.make_model(tmp_path, arch)), ["neg", "pos"])
    assert attn_implementation(model) == expected


def test_explicit_eager_is_kept(tmp_path):
    model = load_model(ModelConfig(name_or_path=tiny.make_model(tmp_path, "bert"), attn_implementation="eager"),
                       ["neg", "pos"])
    assert attn_implementation(model) == "eager"


def test_explicit_attention_the_model_lacks_is_one_line_exit_2(tmp_path):
    path = tiny.make_model(tmp_path / "m", "deberta-v2")
    with pytest.raises(ModelError, match="model.attn_implementation=sdpa is not supported by this architecture"):
        load_model(ModelConfig(name_or_path=path, attn_implementation="sdpa"), ["neg", "pos"])
    data = tiny.make_data(tmp_path / "d", n_train=16, n_test=4)
    p = run_cli("launch/train.py", "--recipe", "/dev/null", *tiny_overrides(path, data, tmp_path / "out"),
                "model.attn_implementation=sdpa")
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "use auto" in errors[0], p.stderr[-2000:]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_config_label_names_only_when_the_model_names_its_classes(tmp_path):
    named = tiny.make_model(tmp_path / "named", "bert", id2label={0: "negative", 1: "positive"})
    assert config_label_names(ModelConfig(name_or_path=named)) == ["negative", "positive"]
    plain = tiny.make_model(tmp_path / "plain", "bert")  # transformers' LABEL_0, LABEL_1
    assert config_label_names(ModelConfig(name_or_path=plain)) is None
    assert config_label_names(ModelConfig(name_or_path=str(tmp_path / "missing"))) is None
    assert json.loads((tmp_path / "named" / "config.json").read_text())["id2label"] == {"0": "negative",
                                                                                         "1": "positive"}


@pytest.mark.parametrize("arch, pad, expected", [
    ("bert", 0, 128),  # max_position_embeddings rows, numbered from 0
    ("roberta", 1, 128),  # RoBERTa's 130 rows number positions from padding_idx + 1 = 2
    ("roberta", 0, 129),
    ("deberta-v2", 0, None),  # relative positions only: no table, no limit
    ("llama", 0, None),  # rotary
])
def test_max_positions_reads_the_position_table(arch, pad, expected):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    spec = dict(tiny.ARCH[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=50, pad_token_id=pad, **spec)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    assert max_positions(model) == expected
    if expected is not None:  # the limit is exact: one more position fails in transformers' own forward
        ids = torch.full((1, expected), 7)
        model(input_ids=ids)
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, expected + 1), 7))


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    data = tiny.make_data(folder, n_train=16, n_test=8)
    for split in ("train", "test"):
        frame = pd.read_parquet(folder / f"{split}.parquet")
        frame["text"] = (frame["text"] + " ") * 40  # hundreds of tokens each
        frame.to_parquet(folder / f"{split}.parquet")
    return data


def test_max_length_past_the_position_table_stops_before_base(tiny_bert, long_texts, tmp_path):
    out = tmp_path / "out"
    p = run_cli("launch/train.py", "--recipe", "/dev/null", *tiny_overrides(tiny_bert, long_texts, out),
                "data.max_length=129", "train.max_steps=1", timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip() == (f"error: data.max_length=129 is past the 128 positions of {tiny_bert}; "
                                "set it to 128 or less")
    assert not (out / "base").exists() and not (out / "metrics.json").exists()
    p = run_cli("launch/evaluate.py", "--model", tiny_bert, "--data", long_texts, "--max-length", "129", timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: --max-length=129 is past the 128"), p.stderr


def test_rotary_decoder_has_no_position_limit(tmp_path, long_texts):
    llama = tiny.make_model(tmp_path / "llama", "llama")  # max_position_embeddings 128, rotary
    p = run_cli("launch/train.py", "--recipe", "/dev/null", *tiny_overrides(llama, long_texts, tmp_path / "out"),
                "data.max_length=300", "train.max_steps=1", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
