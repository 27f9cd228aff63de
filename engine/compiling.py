"""torch.compile for a run (train.compile): the recipe's mode, static shapes where data.pad_buckets
bounds them, and what compiling cost (graphs, seconds) for metrics.json."""
from __future__ import annotations

import torch


def compile_model(model: torch.nn.Module, recipe) -> torch.nn.Module:
    """`model` under torch.compile in train.compile_mode.

    With data.pad_buckets every batch has one of len(buckets) lengths (and eval batches a fixed row
    count), so each shape is compiled once, static (dynamic=False: no dynamic-shape graph, which
    inductor runs slower and CUDA graphs cannot hold). Training and evaluation compile a graph each per
    bucket (grad mode and model.training are guarded): dynamo's per-function limit (8 by default,
    beyond which it runs eagerly) is raised to hold them.
    """
    mode, buckets, dynamic = recipe.train.compile_mode, recipe.data.pad_buckets, None
    if buckets:
        dynamic = False
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 2 * len(buckets) + 2)
    from torch._dynamo.utils import counters, cumulative_time_spent_ns

    counters.clear()  # torch's process-wide tallies: from here on they are this run's (see stats)
    cumulative_time_spent_ns.clear()
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=dynamic)


def stats(model: torch.nn.Module) -> dict:
    """For a compiled model: the graphs compiled since compile_model and the seconds spent compiling
    them (dynamo's frames and the backward graphs), from torch's own tallies; {} for an eager one."""
    if not hasattr(model, "_orig_mod"):  # torch.compile's wrapper (importing dynamo to ask costs ~1 s)
        return {}
    from torch._dynamo.utils import calculate_time_spent, counters

    return {"compile_graphs": int(counters["stats"]["unique_graphs"]),
            "compile_seconds": round(calculate_time_spent().get("total_wall_time", 0.0), 2)}
