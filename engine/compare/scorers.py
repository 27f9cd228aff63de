"""The models compared: transformers classifiers (through the engine's own evaluation) and VADER.

Each gives native logits over its own label names; engine.compare.polarity maps them to polarities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from engine import batching, modeling
from engine.compare.polarity import POLARITIES, LabelMap
from engine.compare.recipe import VADER, CompareRecipe
from engine.config import ModelConfig
from engine.distributed import Dist
from engine.errors import ModelError
from engine.evaluation import predict
from engine.precision import Precision
from engine.sources import Examples

# VADER's authors call a compound score >= 0.05 positive, <= -0.05 negative, neutral in between.
# Logits scale * (-c, 0.05, c) keep exactly that decision under softmax; the scale only sets how
# confident the probabilities look, which temperature scaling then re-fits like for any model.
VADER_THRESHOLD = 0.05
VADER_SCALE = 4.0


def vader_analyzer_class():
    """VADER's analyzer class; an optional dependency, installed by the `compare` extra."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ModelError("vader: the vaderSentiment package is not installed; install the engine's "
                         "`compare` extra: pip install -e '.[compare]'") from None
    return SentimentIntensityAnalyzer


class Scorer:
    """One model: its label names, and its native logits for a list of texts."""
    name: str
    spec: str
    labels: list[str]
    kind: str
    params: int | None = None

    def logits(self, texts: list[str], max_length: int, cache_dir: str | None) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VaderScorer(Scorer):
    kind = "lexicon"

    def __init__(self, spec: str):
        self.name = self.spec = spec
        self.labels = list(POLARITIES)
        self._analyzer = vader_analyzer_class()()

    def compound(self, texts: list[str]) -> np.ndarray:
        return np.array([self._analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)

    def logits(self, texts, max_length=None, cache_dir=None) -> np.ndarray:
        c = self.compound(texts)
        return VADER_SCALE * np.stack([-c, np.full_like(c, VADER_THRESHOLD), c], axis=-1)


class TransformersScorer(Scorer):
    kind = "transformers"

    def __init__(self, spec: str, recipe: CompareRecipe):
        cfg = ModelConfig(name_or_path=spec, trust_remote_code=recipe.trust_remote_code)
        self.spec, self.name = spec, display_name(spec)
        self.tokenizer = modeling.load_tokenizer(cfg)
        kwargs = modeling.attention_kwargs(cfg)
        # loading info tells a trained head from one transformers just initialised at random
        self.model, info = modeling.load_pretrained("model", AutoModelForSequenceClassification.from_pretrained, cfg,
                                          output_loading_info=True, **kwargs)
        body = self.model.base_model_prefix + "."
        head = [k for k in info.get("missing_keys", ()) if not k.startswith(body)]
        if head:
            raise ModelError(f"{spec}: has no trained classification head ({', '.join(sorted(head)[:2])} "
                             f"newly initialised); compare a run's base/ or tuned/ snapshot instead")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.labels = modeling.label_names_of(self.model)
        self.params = modeling.param_counts(self.model)["total_params"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = Dist(device=device)
        self.model.to(device)
        self.precision = Precision(recipe.precision, device)
        self.batch_size = recipe.batch_size
        limit = getattr(self.tokenizer, "model_max_length", None)
        self.max_length_limit = limit if isinstance(limit, int) and limit < 100_000 else None

    def logits(self, texts, max_length, cache_dir=None) -> np.ndarray:
        if self.max_length_limit:  # e.g. BERTweet reads 128 tokens at most
            max_length = min(max_length, self.max_length_limit)
        examples = Examples(list(texts), np.zeros(len(texts), dtype=np.int64), "texts")
        tokens = batching.tokenize(examples, self.tokenizer, max_length, cache_dir)
        return predict(self.model, tokens, self.batch_size, self.precision, self.dist,
                       self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left")

    def close(self) -> None:
        del self.model


def display_name(spec: str) -> str:
    """`runs/x/tuned` -> `x/tuned`; hub names and `vader` stay as written."""
    path = Path(spec)
    if spec.startswith(("package://",)):
        return spec[len("package://"):]
    if path.exists() and path.name in ("base", "tuned") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    if path.exists() or spec.startswith((".", "/", "~")):
        return path.name or spec
    return spec


def load_scorer(spec: str, recipe: CompareRecipe) -> Scorer:
    return VaderScorer(spec) if spec.lower() == VADER else TransformersScorer(spec, recipe)


def labels_of(spec: str, recipe: CompareRecipe) -> list[str]:
    """A model's label names from its config alone (no weights loaded)."""
    if spec.lower() == VADER:
        vader_analyzer_class()  # not installed: say so before minutes of scoring other models
        return list(POLARITIES)
    cfg = ModelConfig(name_or_path=spec, trust_remote_code=recipe.trust_remote_code)
    config = modeling.load_pretrained("config", AutoConfig.from_pretrained, cfg)
    return [config.id2label[i] for i in range(config.num_labels)]


def own_scores(scorer: Scorer, lm: LabelMap, texts: list[str], native: np.ndarray) -> list:
    """A model's own one-number reading: VADER's compound, a star model's expected stars."""
    if isinstance(scorer, VaderScorer):
        return [float(c) for c in scorer.compound(texts)]
    if lm.stars is not None:
        return [float(v) for v in native @ np.asarray(lm.stars, dtype=np.float64)]
    return [None] * len(texts)
