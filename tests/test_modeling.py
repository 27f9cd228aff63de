"""Loading: the attention kernel that fits the architecture, and the class names a config gives."""
import json

import pytest

import tiny
from conftest import run_cli, tiny_overrides
from engine.config import ModelConfig
from engine.modeling import ModelError, attn_implementation, config_label_names, load_model


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
