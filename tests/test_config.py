import pytest

from conftest import ROOT, run_cli
from engine.config import Recipe
from engine.errors import RecipeError
from engine.recipe_yaml import dump_recipe, load_recipe


def test_defaults_are_the_seed_experiment():
    r = load_recipe(None)
    assert isinstance(r, Recipe)
    assert (r.model.name_or_path, r.data.source, r.train.lr, r.train.batch_size) == \
        ("distilbert-base-uncased", "imdb", 2e-5, 16)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  lr: 3.0e-5\n  epochs: 1\ndata:\n  max_length: 128\n")
    r = load_recipe(f, ["train.lr=1e-4", "data.where={source: imdb}", "peft.target_modules=[query,value]",
                        "data.eval_size=null"])
    assert r.train.lr == 1e-4 and r.train.epochs == 1.0 and r.data.max_length == 128
    assert r.data.where == {"source": "imdb"}
    assert r.peft.target_modules == ["query", "value"]
    assert r.data.eval_size is None


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("lr=1", "unknown key 'lr' (did you mean 'train.lr'?)"),
    ("train.batch_size=eight", "'train.batch_size' must be an integer, got 'eight'"),
    ("train.precision=fp8", "'train.precision' must be one of auto, fp32, bf16, fp16; got 'fp8'"),
    ("train.keep_best=maybe", "'train.keep_best' must be true or false"),
    ("train.batch_size=0", "'train.batch_size' must be >= 1"),
    ("train.warmup_ratio=1.5", "'train.warmup_ratio' must be in [0, 1)"),
    ("data.holdout_size=100", "'data.holdout_size' carves the eval set from train"),
    ("train=3", "'train' must be a section of keys"),
    ("train.lr=.inf", "'train.lr' must be a finite number"),
    ("train.lr=.nan", "'train.lr' must be a finite number"),
    ("train.epochs=.inf", "'train.epochs' must be a finite number"),
    ("train.warmup_ratio=.nan", "'train.warmup_ratio' must be a finite number"),
    ("peft.dropout=-.inf", "'peft.dropout' must be a finite number"),
    ("train.lr=nan", "'train.lr' must be a finite number"),
    ("train.weight_decay=-0.1", "'train.weight_decay' must be >= 0"),
    ("train.max_grad_norm=-1", "'train.max_grad_norm' must be >= 0"),
    ("train.batch_size=99999999999999999999999", "'train.batch_size' must be at most"),
    ("seed=-99999999999999999999999", "'seed' must be at most"),
    ("train.epochs=1" + "0" * 400, "'train.epochs' must be a finite number"),
    ("train.num_threads=-1", "'train.num_threads' must be in 1..4096"),
    ("train.num_threads=0", "'train.num_threads' must be in 1..4096"),
    ("distributed.timeout_s=-1", "'distributed.timeout_s' must be >= 1"),
    ("distributed.timeout_s=0", "'distributed.timeout_s' must be >= 1"),
    ("distributed.replicas=0", "'distributed.replicas' must be >= 1"),
    ("distributed.backend=glooo", "'distributed.backend' must be one of gloo, nccl, mpi"),
    ("distributed.backend=cpu:gloo,cuda:nccll", "got 'cpu:gloo,cuda:nccll'"),
    ("seed=-1", "'seed' must be >= 0"),
    ("output_dir=", "'output_dir' is empty"),
    ("data.eval_split=", "'data.eval_split' is empty (null leaves it unset)"),
    ("data.encoding=utf-9", "'data.encoding' 'utf-9' is not a known text encoding"),
    ("data.label_names=[pos]", "'data.label_names' must list at least two different class names"),
    ("data.label_names=[pos,POS]", "'data.label_names' must list at least two different class names"),
    ("peft.target_modules=[]", "'peft.target_modules' is empty"),
    ("data.head_tokens=0", "'data.head_tokens' must be >= 1"),
    ("train.epochs=1e12", "'train.epochs' must be at most 2147483647"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="broken.yaml: not valid YAML"):
        load_recipe(f)
    f.write_text("- a list\n")
    with pytest.raises(RecipeError, match="broken.yaml: a recipe must be a mapping"):
        load_recipe(f)


def test_dump_round_trips(tmp_path):
    r = load_recipe(None, ["train.lr=5e-5", "data.where={source: imdb}"])
    dump_recipe(r, tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml") == r


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    from engine.compare import CompareRecipe  # compare_*.yaml are launch/compare.py's recipes
    loaded = load_recipe(ROOT / "recipes" / recipe, schema=CompareRecipe if recipe.startswith("compare_") else Recipe)
    if isinstance(loaded, Recipe):  # a training recipe computes in what this machine does natively
        assert loaded.train.precision == "auto"


def test_cli_unknown_key_exits_2_with_one_line(tmp_path):
    f = tmp_path / "r.yaml"
    out = tmp_path / "out"
    f.write_text(f"output_dir: {out}\ntrain:\n  lrr: 1.0e-4\n")
    p = run_cli("launch/train.py", "--recipe", f)
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: {f}: unknown key 'train.lrr' (did you mean 'train.lr'?)"
    assert not out.exists()  # nothing is written before the recipe is valid


def test_cli_takes_flags_after_overrides_and_usage_errors_are_plain(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(f"output_dir: {tmp_path / 'out'}\n")
    p = run_cli("launch/train.py", "--recipe", f, "train.lrr=1", "--overwrite")
    assert p.returncode == 2 and "unknown key 'train.lrr'" in p.stderr  # --overwrite was taken as a flag
    p = run_cli("launch/train.py", "--recipe", f, "--no-such-flag")
    assert p.returncode == 2 and "unrecognized arguments: --no-such-flag" in p.stderr
    assert "Traceback" not in p.stderr


def test_backend_pairs_load():
    assert load_recipe(None, ["distributed.backend=cpu:gloo,cuda:nccl"]).distributed.backend == "cpu:gloo,cuda:nccl"


@pytest.mark.parametrize("key", ["output_dir", "data.cache_dir"])
def test_folders_that_cannot_be_created_stop_at_load(tmp_path, key):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RecipeError, match=f"'{key}' cannot be created \\(.*a_file is not a folder\\)"):
        load_recipe(None, [f"{key}={tmp_path / 'a_file' / 'sub'}"])
    with pytest.raises(RecipeError, match="a name in it is longer than 255 bytes"):
        load_recipe(None, [f"{key}={tmp_path / ('x' * 300)}"])
    assert load_recipe(None, [f"{key}={tmp_path / 'new' / 'deeper'}"])  # creatable: fine, and not created
    assert not (tmp_path / "new").exists()
