"""Recipe schema: every key, its default and its meaning, in one place.

A recipe is a YAML file whose sections mirror the dataclasses below; `key.sub=value` arguments on
the command line override it. Loading validates everything up front, so a typo stops the run with
one line instead of failing an hour in.
"""
from __future__ import annotations

import codecs
import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.errors import RecipeError
from engine.paths import uncreatable

# No count, size, step or seed in a recipe means anything past this; a larger one is a typo that
# would otherwise fail later (an allocation, a numpy seed, a tensor shape) with a traceback.
MAX_INT = 2**31 - 1
# more torch threads than any machine has cores only thrashes, and 2**31 of them exhausts memory
MAX_THREADS = 4096
# what torch.distributed.init_process_group accepts (torch.distributed.Backend.backend_list, less
# "undefined" and the test-only "fake"), here so a typo stops at load without importing torch; a
# backend this build lacks (nccl without CUDA) stops at launch, in engine/distributed.py
BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


@dataclass
class ModelConfig:
    name_or_path: str = "distilbert-base-uncased"  # hub name, local folder, or package://pkg/path
    revision: str | None = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless asked for
    # auto: SDPA where the architecture has it, else its own default (DeBERTa-v2, MPNet: eager);
    # sdpa | eager | flash_attention_2 ask for one and stop with one line where it is missing
    attn_implementation: str | None = "auto"
    gguf_file: str | None = None  # a .gguf file inside name_or_path: de-quantised on load


@dataclass
class DataConfig:
    source: str = "imdb"  # hub dataset name, local file or folder, or package://pkg/path
    train_split: str = "train"
    eval_split: str | None = "test"  # None with holdout_size > 0: carve eval from train
    text_column: str = "text"
    label_column: str = "label"
    label_names: list[str] | None = None  # class order for string labels (default: sorted)
    where: dict[str, Any] = field(default_factory=dict)  # keep rows whose column equals value
    # old -> new column names, in every split that has the old one (SST-2: dev's `content` is
    # train's `sentence`), so one text_column/label_column serves splits that name it differently
    rename_columns: dict[str, str] = field(default_factory=dict)
    encoding: str = "utf-8"  # of csv/tsv/jsonl/txt files (Financial PhraseBank is latin-1)
    max_length: int = 512  # tokens, special tokens included; longer texts are cut (data.truncation)
    # which tokens of a long text are kept: head (the first), tail (the last), or head_tail: the
    # first head_tokens and the last (max_length - head_tokens - special tokens). IMDB reviews often
    # give their verdict at the end (Sun et al. 2019 found the first 128 + last 382 best on IMDB)
    truncation: Literal["head", "tail", "head_tail"] = "head"
    head_tokens: int = 128  # head_tail only
    train_size: int | None = None  # seeded, stratified subset of the train split
    eval_size: int | None = None  # seeded, stratified subset of the eval split
    holdout_size: int = 0  # examples held out of train (seeded, stratified) to evaluate on
    # scored once at the end, base and tuned: the figures of metrics.json's base/tuned; the eval set
    # (eval_split or holdout) then only selects (eval_every, keep_best), its scores go to `evals`
    test_split: str | None = None
    test_size: int | None = None  # seeded, stratified subset of the test split
    cache_dir: str | None = None  # tokenized cache (default ~/.cache/sentiment-engine)
    # pad each batch up to the smallest of these lengths that holds it (increasing, the last one
    # data.max_length) instead of to its longest row rounded up to 8: a compiled model then meets one
    # shape a bucket, each compiled once (docs/training.md, bounded shapes); null: off
    pad_buckets: list[int] | None = None

    def check(self, where: str) -> None:
        """What one data section can check alone (Recipe.check has the rules that span sections)."""
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise RecipeError(f"{where}: 'data.encoding' {self.encoding!r} is not a known text encoding "
                              f"(utf-8, latin-1, ...)") from None
        if self.label_names is not None:
            folded = [n.lower() for n in self.label_names]  # labels match their names case-blind
            if len(folded) < 2 or len(set(folded)) != len(folded):
                raise RecipeError(f"{where}: 'data.label_names' must list at least two different class "
                                  f"names, got {self.label_names}")
        b = self.pad_buckets
        if b is not None and (not b or b[0] < 1 or b != sorted(set(b)) or b[-1] != self.max_length):
            # the last one holds any batch, and no batch pads past the length the model was checked for
            raise RecipeError(f"{where}: 'data.pad_buckets' must be increasing lengths >= 1 ending at "
                              f"data.max_length ({self.max_length}), got {b}")


@dataclass
class TrainConfig:
    epochs: float = 2.0
    max_steps: int = 0  # optimizer steps; > 0 stops there (and sizes the schedule)
    batch_size: int = 16  # per process, per micro-step
    eval_batch_size: int = 64  # per process
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup_ratio: float = 0.0
    # lr after warm-up: linear or cosine decay to min_lr_ratio * lr at the last step, or constant
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    # autocast dtype; weights stay fp32. auto: bf16 where the hardware computes it natively (a GPU
    # with bf16 units, a CPU whose bf16 matmul a cached probe finds >= 1.3x fp32), else fp32.
    # The default stays fp32 so a recipe without the key repeats its arithmetic exactly anywhere;
    # the shipped recipes say auto.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    group_by_length: bool = True  # batches of similar lengths: less padding
    eval_every: int = 0  # steps; 0 = only at each epoch end
    keep_best: bool = False  # tuned/ = the best eval state (by select_metric) instead of the last
    # what "best" means for keep_best and early stopping: accuracy, f1 (macro) or loss (lower is better)
    select_metric: Literal["accuracy", "f1", "loss"] = "accuracy"
    early_stopping_patience: int = 0  # stop after this many evals without improvement; 0 = never
    # weights of the classes in the training loss: none, balanced (n / (classes x n_class) over the
    # train split: rare classes count more) or a list, one positive weight per class in label order
    class_weights: Any = "none"
    log_every: int = 10  # steps between logged scalars
    num_threads: int | None = None  # torch threads per process (default: cores / processes)
    compile: bool = False  # torch.compile the model
    # torch.compile's mode: default; reduce-overhead (CUDA graphs: fewer launches, wants the bounded
    # shapes of data.pad_buckets); max-autotune (searches kernels: compiles longer)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~30% slower

    def check(self, where: str) -> None:
        if self.compile_mode != "default" and not self.compile:
            raise RecipeError(f"{where}: 'train.compile_mode' {self.compile_mode} needs train.compile=true")


@dataclass
class DistributedConfig:
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    backend: str | None = None  # default: nccl on CUDA, gloo on CPU
    replicas: int = 1  # fsdp: > 1 = hybrid mesh, shard inside groups of world/replicas, replicate across
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (less memory)
    cpu_offload: bool = False  # fsdp: keep sharded parameters and optimizer state in host memory
    timeout_s: int = 600  # a collective that waits longer fails instead of hanging

    def check(self, where: str) -> None:
        if self.replicas < 1:
            raise RecipeError(f"{where}: 'distributed.replicas' must be >= 1, got {self.replicas}")
        if self.timeout_s < 1:
            raise RecipeError(f"{where}: 'distributed.timeout_s' must be >= 1 (seconds), got {self.timeout_s}")
        if self.backend is not None:
            # "gloo", or torch's per-device form "cpu:gloo,cuda:nccl"
            for part in self.backend.split(","):
                name = part.rpartition(":")[2].strip().lower()
                if name not in BACKENDS:
                    raise RecipeError(f"{where}: 'distributed.backend' must be one of {', '.join(BACKENDS)} "
                                      f"(or device:backend pairs, cpu:gloo,cuda:nccl), or null; got "
                                      f"{self.backend!r}")


@dataclass
class PeftConfig:
    # none: train every weight; lora: low-rank adapters on a frozen body; qlora: the same on a
    # 4-bit NF4 copy of the body (bitsandbytes). The classification head always trains whole.
    # head: the body frozen, only the classification head trains (a linear-probe baseline;
    # engine/adapters.py head_modules says what the head is); tuned/ is a plain snapshot
    method: Literal["none", "lora", "qlora", "head"] = "none"
    r: int = 8  # rank of each adapter
    alpha: int = 16  # adapter output is scaled by alpha / r
    dropout: float = 0.1  # on the adapter's input, training only
    # layers that get adapters; default per architecture (engine/adapters.py DEFAULT_TARGETS): the
    # attention's query and value for encoders (DistilBERT q_lin,v_lin; BERT query,value), all-linear
    # for decoder LLMs and architectures not listed
    target_modules: list[str] | None = None


@dataclass
class CheckpointConfig:
    every: int = 500  # optimizer steps between training-state checkpoints (also at each epoch end)
    keep: int = 2  # newest checkpoints kept under output_dir/checkpoints/; 0 writes none


@dataclass
class TrackingConfig:
    # TensorBoard (output_dir/tb) and log.jsonl are always written; MLflow is an optional extra:
    # pip install -e ".[mlflow]"
    mlflow: bool = False  # also log params, per-step and final metrics and tuned/ to MLflow (main rank)
    mlflow_uri: str | None = None  # tracking URI; default: a local file store ./mlruns (works offline)
    mlflow_experiment: str = "sentiment-engine"

    def check(self, where: str) -> None:
        if self.mlflow and importlib.util.find_spec("mlflow") is None:
            raise RecipeError(f"{where}: 'tracking.mlflow' is true but mlflow is not installed: "
                              f"pip install -e \".[mlflow]\" (or pip install mlflow-skinny)")


@dataclass
class Recipe:
    output_dir: str = "runs/default"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self, where: str) -> None:
        """Cross-key rules that a type alone cannot express."""
        t, d = self.train, self.data
        positive = {
            "train.batch_size": t.batch_size, "train.eval_batch_size": t.eval_batch_size,
            "train.grad_accum": t.grad_accum, "data.max_length": d.max_length, "train.log_every": t.log_every,
        }
        for key, value in positive.items():
            if value < 1:
                raise RecipeError(f"{where}: '{key}' must be >= 1, got {value}")
        if self.seed < 0:  # numpy's seeds are unsigned
            raise RecipeError(f"{where}: 'seed' must be >= 0, got {self.seed}")
        if t.num_threads is not None and not 1 <= t.num_threads <= MAX_THREADS:
            raise RecipeError(f"{where}: 'train.num_threads' must be in 1..{MAX_THREADS} (or null: cores / "
                              f"processes), got {t.num_threads}")
        if t.epochs > MAX_INT:
            raise RecipeError(f"{where}: 'train.epochs' must be at most {MAX_INT}, got {t.epochs}")
        for key, folder in (("output_dir", self.output_dir), ("data.cache_dir", d.cache_dir)):
            why = uncreatable(folder) if folder is not None else None
            if why:
                raise RecipeError(f"{where}: '{key}' cannot be created ({why})")
        for key, value in {"train.max_steps": t.max_steps, "train.eval_every": t.eval_every,
                           "data.holdout_size": d.holdout_size, "checkpoint.every": self.checkpoint.every,
                           "train.early_stopping_patience": t.early_stopping_patience,
                           "checkpoint.keep": self.checkpoint.keep}.items():
            if value < 0:
                raise RecipeError(f"{where}: '{key}' must be >= 0, got {value}")
        if t.epochs <= 0 and t.max_steps == 0:
            raise RecipeError(f"{where}: 'train.epochs' must be > 0 (or set train.max_steps)")
        # AdamW moves each weight by about lr a step whatever the gradient's scale: past 1 one step
        # outweighs the pretrained weights themselves (typically 0.01-0.1), and 1e300 makes them inf
        if not 0 < t.lr <= 1:
            raise RecipeError(f"{where}: 'train.lr' must be in (0, 1], got {t.lr}")
        for key, value in {"train.weight_decay": t.weight_decay, "train.max_grad_norm": t.max_grad_norm}.items():
            if value < 0:
                raise RecipeError(f"{where}: '{key}' must be >= 0, got {value}")
        if t.lr * t.weight_decay >= 1:  # AdamW scales weights by 1 - lr * weight_decay each step
            raise RecipeError(f"{where}: 'train.weight_decay' x 'train.lr' must be below 1 (each step scales "
                              f"the weights by 1 - lr x weight_decay), got {t.weight_decay} x {t.lr}")
        if not 0 <= t.warmup_ratio < 1:
            raise RecipeError(f"{where}: 'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
        if not 0 <= t.min_lr_ratio <= 1:
            raise RecipeError(f"{where}: 'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}")
        for key, value in {"data.train_size": d.train_size, "data.eval_size": d.eval_size,
                           "data.test_size": d.test_size}.items():
            if value is not None and value < 1:
                raise RecipeError(f"{where}: '{key}' must be >= 1, got {value}")
        if t.class_weights is None:
            t.class_weights = "none"
        if isinstance(t.class_weights, list):
            if not t.class_weights or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                              and math.isfinite(w) and w > 0 for w in t.class_weights):
                raise RecipeError(f"{where}: 'train.class_weights' must be positive finite numbers, "
                                  f"got {t.class_weights!r}")
            t.class_weights = [float(w) for w in t.class_weights]
        elif t.class_weights not in ("none", "balanced"):
            raise RecipeError(f"{where}: 'train.class_weights' must be none, balanced or a list of "
                              f"weights, one per class; got {t.class_weights!r}")
        if t.early_stopping_patience and not t.keep_best:
            # as the Trainer's EarlyStoppingCallback: tuned/ would otherwise be the weights `patience`
            # evaluations past the best
            raise RecipeError(f"{where}: 'train.early_stopping_patience' needs train.keep_best=true")
        if d.holdout_size and d.eval_split:
            raise RecipeError(f"{where}: 'data.holdout_size' carves the eval set from train; "
                              f"set data.eval_split=null to use it (got eval_split={d.eval_split!r})")
        if not d.holdout_size and not d.eval_split:
            raise RecipeError(f"{where}: no eval set: set 'data.eval_split' or 'data.holdout_size'")
        if d.test_split is not None and d.test_split in (d.train_split, d.eval_split):
            raise RecipeError(f"{where}: 'data.test_split' ({d.test_split!r}) must differ from data.train_split "
                              f"and data.eval_split: the test set is scored, never trained or selected on "
                              f"(carve a dev set from train: data.eval_split=null data.holdout_size=N)")
        if d.test_size is not None and d.test_split is None:
            raise RecipeError(f"{where}: 'data.test_size' needs 'data.test_split'")
        # the special tokens are counted against the tokenizer when tokenizing; here, what is known
        if d.head_tokens < 1:
            raise RecipeError(f"{where}: 'data.head_tokens' must be >= 1, got {d.head_tokens}")
        if d.truncation == "head_tail" and not 0 < d.head_tokens < d.max_length:
            raise RecipeError(f"{where}: 'data.head_tokens' must be in 1..{d.max_length - 1} (below "
                              f"data.max_length, leaving room for the tail), got {d.head_tokens}")
        p = self.peft
        if p.r < 1:
            raise RecipeError(f"{where}: 'peft.r' must be >= 1, got {p.r}")
        if p.alpha <= 0:
            raise RecipeError(f"{where}: 'peft.alpha' must be > 0, got {p.alpha}")
        if not 0 <= p.dropout < 1:
            raise RecipeError(f"{where}: 'peft.dropout' must be in [0, 1), got {p.dropout}")
        if p.target_modules is not None and not p.target_modules:
            raise RecipeError(f"{where}: 'peft.target_modules' is empty; list layer names, or null for the "
                              f"architecture's default")


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating


def load_recipe(path: str | Path | None, overrides: list[str] = (), schema: type = Recipe):
    """YAML file (or defaults when path is None) + `key.sub=value` overrides -> validated dataclass."""
    where = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{where}: cannot read recipe ({e.__class__.__name__}: {e})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: not valid YAML ({_one_line(e)})") from None
        except RecursionError:
            raise RecipeError(f"{where}: not valid YAML (nested too deeply)") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override '{item}': expected key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed, f"override '{item}'")
    try:
        return _build(schema, raw, "", where, schema)
    except RecursionError:  # a self-referencing YAML alias
        raise RecipeError(f"{where}: a value refers to itself") from None


def to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False), encoding="utf-8")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _keys(schema: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(schema).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, prefix + name + ".")
    return out


def _build(schema: type, raw: dict, prefix: str, where: str, root: type):
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            # suggestions search the whole recipe, so top-level 'lr' suggests 'train.lr'
            keys = _keys(root)
            near = [k for k in keys if k.rsplit(".", 1)[-1] == str(key)]
            near = near or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise RecipeError(f"{where}: unknown key '{dotted}'{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, where, root)
    obj = schema(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def _coerce(tp: Any, value: Any, key: str, where: str, root: type, optional: bool = False) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, where, root, optional=type(None) in args)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: '{key}' must be a section of keys, got {value!r}")
        return _build(tp, value, key + ".", where, root)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: '{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise RecipeError(f"{where}: '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", where, root) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise RecipeError(f"{where}: '{key}' must be at most {MAX_INT} in size, got {value}")
            return value
        raise RecipeError(f"{where}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int past float range
                raise RecipeError(f"{where}: '{key}' must be a finite number, got {value}") from None
        elif isinstance(value, str):  # YAML 1.1 reads 2e-5 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise RecipeError(f"{where}: '{key}' must be a number, got {value!r}")
        # NaN passes every range check (all comparisons are false) and inf overflows step counts
        if not math.isfinite(number):
            raise RecipeError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            # an empty name, path or column means "here" or "nothing" by accident (output_dir "" is
            # the working folder); a key that may be left unset takes null instead
            if not value.strip():
                raise RecipeError(f"{where}: '{key}' is empty" + (" (null leaves it unset)" if optional else ""))
            return value
        raise RecipeError(f"{where}: '{key}' must be a string, got {value!r}")
    return value
