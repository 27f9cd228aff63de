"""Recipe schema: every key, its default, its meaning and whether it may change on resume, in one place.

A recipe is a YAML file whose sections mirror the dataclasses below; `key.sub=value` arguments on
the command line override it (engine/recipe_yaml.py reads and writes them). Loading validates
everything up front, so a typo stops the run with one line instead of failing an hour in.
"""
from __future__ import annotations

import codecs
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Literal

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

# On --resume every key must equal the checkpoint's (engine/resume.py refuses a change in one line
# naming the key) unless its section's `@on_resume` lists it under `may_change`, with the reason.
# Every key has a decision: tests/test_resume_keys.py fails on a key added without one.
FIXED = "fixed"


def on_resume(fixed: tuple[str, ...] = (), may_change: dict[str, str] | None = None):
    """A section's resume rule for each of its keys, as the class attribute RESUME {key: FIXED or
    why it may change} (sections nested in a section carry their own)."""
    def mark(cls):
        cls.RESUME = {**dict.fromkeys(fixed, FIXED), **(may_change or {})}
        return cls
    return mark


@on_resume(fixed=("name_or_path", "revision", "trust_remote_code", "attn_implementation", "gguf_file"))
@dataclass
class ModelConfig:
    name_or_path: str = "distilbert-base-uncased"  # hub name, local folder, or package://pkg/path
    revision: str | None = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless asked for
    # auto: SDPA where the architecture has it, else its own default (DeBERTa-v2, MPNet: eager);
    # sdpa | eager | flash_attention_2 ask for one and stop with one line where it is missing
    attn_implementation: str | None = "auto"
    gguf_file: str | None = None  # a .gguf file inside name_or_path: de-quantised on load


@on_resume(fixed=("source", "train_split", "eval_split", "text_column", "label_column", "label_names", "where",
                  "rename_columns", "encoding", "max_length", "truncation", "head_tokens", "train_size",
                  "eval_size", "holdout_size", "test_split", "test_size"),
           may_change={"cache_dir": "where token ids and base scores are cached, not what they are",
                       "pad_buckets": "padding only: masked positions change no score beyond float rounding"})
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
            folded = [str(n).strip().lower() for n in self.label_names]  # engine/labels.py: fold
            if len(folded) < 2 or len(set(folded)) != len(folded):
                raise RecipeError(f"{where}: 'data.label_names' must list at least two different class "
                                  f"names, got {self.label_names}")
        b = self.pad_buckets
        if b is not None and (not b or b[0] < 1 or b != sorted(set(b)) or b[-1] != self.max_length):
            # the last one holds any batch, and no batch pads past the length the model was checked for
            raise RecipeError(f"{where}: 'data.pad_buckets' must be increasing lengths >= 1 ending at "
                              f"data.max_length ({self.max_length}), got {b}")


LENGTH = "the run's length: a resume may extend it (the lr schedule is then rebuilt over the new length)"


@on_resume(fixed=("batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "schedule", "min_lr_ratio",
                  "max_grad_norm", "precision", "group_by_length", "keep_best", "select_metric",
                  "early_stopping_patience", "class_weights"),
           may_change={"epochs": LENGTH, "max_steps": LENGTH,
                       "eval_batch_size": "memory only: scores agree up to float rounding",
                       "eval_every": "when the eval set is scored; the training steps are the same",
                       "log_every": "how often the log is written",
                       "num_threads": "speed: a resume may run on another machine",
                       "compile": "kernels, not the model: a checkpoint holds the plain model's names",
                       "compile_mode": "how torch.compile builds its kernels, not what they compute",
                       "activation_checkpointing": "memory: activations are recomputed with the same masks"})
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
        positive = {"train.batch_size": self.batch_size, "train.eval_batch_size": self.eval_batch_size,
                    "train.grad_accum": self.grad_accum, "train.log_every": self.log_every}
        for key, value in positive.items():
            if value < 1:
                raise RecipeError(f"{where}: '{key}' must be >= 1, got {value}")
        if self.num_threads is not None and not 1 <= self.num_threads <= MAX_THREADS:
            raise RecipeError(f"{where}: 'train.num_threads' must be in 1..{MAX_THREADS} (or null: cores / "
                              f"processes), got {self.num_threads}")
        if self.epochs > MAX_INT:
            raise RecipeError(f"{where}: 'train.epochs' must be at most {MAX_INT}, got {self.epochs}")
        for key, value in {"train.max_steps": self.max_steps, "train.eval_every": self.eval_every,
                           "train.early_stopping_patience": self.early_stopping_patience,
                           "train.weight_decay": self.weight_decay, "train.max_grad_norm": self.max_grad_norm}.items():
            if value < 0:
                raise RecipeError(f"{where}: '{key}' must be >= 0, got {value}")
        if self.epochs <= 0 and self.max_steps == 0:
            raise RecipeError(f"{where}: 'train.epochs' must be > 0 (or set train.max_steps)")
        # AdamW moves each weight by about lr a step whatever the gradient's scale: past 1 one step
        # outweighs the pretrained weights themselves (typically 0.01-0.1), and 1e300 makes them inf
        if not 0 < self.lr <= 1:
            raise RecipeError(f"{where}: 'train.lr' must be in (0, 1], got {self.lr}")
        if self.lr * self.weight_decay >= 1:  # AdamW scales weights by 1 - lr * weight_decay each step
            raise RecipeError(f"{where}: 'train.weight_decay' x 'train.lr' must be below 1 (each step scales "
                              f"the weights by 1 - lr x weight_decay), got {self.weight_decay} x {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError(f"{where}: 'train.warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RecipeError(f"{where}: 'train.min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")
        self.class_weights = checked_class_weights(self.class_weights, where)
        if self.early_stopping_patience and not self.keep_best:
            # as the Trainer's EarlyStoppingCallback: tuned/ would otherwise be the weights `patience`
            # evaluations past the best
            raise RecipeError(f"{where}: 'train.early_stopping_patience' needs train.keep_best=true")
        if self.compile_mode != "default" and not self.compile:
            raise RecipeError(f"{where}: 'train.compile_mode' {self.compile_mode} needs train.compile=true")


def checked_class_weights(spec: Any, where: str) -> str | list[float]:
    """train.class_weights as none, balanced or a list of positive finite floats."""
    if spec is None:
        return "none"
    if isinstance(spec, list):
        if not spec or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                               and w > 0 for w in spec):
            raise RecipeError(f"{where}: 'train.class_weights' must be positive finite numbers, got {spec!r}")
        return [float(w) for w in spec]
    if spec not in ("none", "balanced"):
        raise RecipeError(f"{where}: 'train.class_weights' must be none, balanced or a list of "
                          f"weights, one per class; got {spec!r}")
    return spec


@on_resume(fixed=("strategy", "replicas", "cpu_offload"),
           may_change={"backend": "the transport of collectives, not what they compute",
                       "reshard_after_forward": "memory: when FSDP frees gathered weights; the shards are the same",
                       "timeout_s": "how long a collective may wait"})
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


@on_resume(fixed=("method", "r", "alpha", "dropout", "target_modules"))
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

    def check(self, where: str) -> None:
        if self.r < 1:
            raise RecipeError(f"{where}: 'peft.r' must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise RecipeError(f"{where}: 'peft.alpha' must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"{where}: 'peft.dropout' must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise RecipeError(f"{where}: 'peft.target_modules' is empty; list layer names, or null for the "
                              f"architecture's default")


@on_resume(may_change={"every": "when checkpoints are written", "keep": "how many are kept"})
@dataclass
class CheckpointConfig:
    every: int = 500  # optimizer steps between training-state checkpoints (also at each epoch end)
    keep: int = 2  # newest checkpoints kept under output_dir/checkpoints/; 0 writes none

    def check(self, where: str) -> None:
        for key, value in {"checkpoint.every": self.every, "checkpoint.keep": self.keep}.items():
            if value < 0:
                raise RecipeError(f"{where}: '{key}' must be >= 0, got {value}")


@on_resume(may_change=dict.fromkeys(("mlflow", "mlflow_uri", "mlflow_experiment"),
                                    "where the run is reported, not what it trains"))
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


@on_resume(fixed=("seed",),
           may_change={"output_dir": "the run's folder may move (the checkpoint resumed must lie in it)"})
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
        """Rules that span sections, or that a section shared with other schemas (compare's datasets)
        does not hold everywhere; each section checked its own keys when it was built."""
        d = self.data
        if self.seed < 0:  # numpy's seeds are unsigned
            raise RecipeError(f"{where}: 'seed' must be >= 0, got {self.seed}")
        for key, folder in (("output_dir", self.output_dir), ("data.cache_dir", d.cache_dir)):
            why = uncreatable(folder) if folder is not None else None
            if why:
                raise RecipeError(f"{where}: '{key}' cannot be created ({why})")
        if d.max_length < 1:
            raise RecipeError(f"{where}: 'data.max_length' must be >= 1, got {d.max_length}")
        if d.holdout_size < 0:
            raise RecipeError(f"{where}: 'data.holdout_size' must be >= 0, got {d.holdout_size}")
        for key, value in {"data.train_size": d.train_size, "data.eval_size": d.eval_size,
                           "data.test_size": d.test_size}.items():
            if value is not None and value < 1:
                raise RecipeError(f"{where}: '{key}' must be >= 1, got {value}")
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
