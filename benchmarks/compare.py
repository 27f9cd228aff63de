"""Per-scenario ratios between two result folders (e.g. this CPU box against an H100).

    python benchmarks/compare.py benchmarks/results/A benchmarks/results/B

Scenarios are matched by id; for each, B/A for samples/s and MFU, and both accuracies. Scenarios in
only one folder are listed, not guessed at. A missing or unreadable folder stops with one line
(exit code 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class CompareError(ValueError):
    pass


def load(folder: str) -> dict:
    path = Path(folder) / "results.json"
    try:
        res = json.loads(path.read_text())
    except OSError as e:
        raise CompareError(f"{path}: cannot read ({e.__class__.__name__}); "
                           f"run benchmarks/run.py --out {folder}") from None
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(res, dict) or not isinstance(res.get("records"), list):
        raise CompareError(f"{path}: not a benchmarks/run.py results file (no 'records')")
    return res


def describe(res: dict) -> str:
    hw = res.get("hardware", {})
    gpus = ", ".join(g["name"] for g in hw.get("gpus") or []) or "no GPU"
    cpu = hw.get("cpu", {})
    flag = "  [DISTURBED by outside load]" if res.get("load", {}).get("disturbed") else ""
    return (f"{res.get('matrix')} on {cpu.get('model')} x{cpu.get('usable_cores')} cores, {gpus}; "
            f"{res.get('started')}{flag}")


def ratio(a, b):
    return b / a if a and b is not None else None


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def compare(a: dict, b: dict) -> list[str]:
    ra = {r["id"]: r for r in a["records"]}
    rb = {r["id"]: r for r in b["records"]}
    shared = [i for i in ra if i in rb]
    head = ("scenario", "A samples/s", "B samples/s", "B/A", "A x base", "B x base", "A MFU", "B MFU", "A acc",
            "B acc", "status")
    rows = [head]
    for i in shared:
        x, y = ra[i], rb[i]
        status = "ok" if x["status"] == y["status"] == "ok" else f"A {x['status']}; B {y['status']}"
        flags = "".join(f" ({side} disturbed)" for side, r in (("A", x), ("B", y)) if r.get("disturbed"))
        rows.append((i, fmt(x["samples_per_s"], ".3g"), fmt(y["samples_per_s"], ".3g"),
                     fmt(ratio(x["samples_per_s"], y["samples_per_s"]), ".2f"),
                     fmt(x.get("ratio_to_baseline"), ".2f"), fmt(y.get("ratio_to_baseline"), ".2f"),
                     fmt(x["mfu"], ".1%"), fmt(y["mfu"], ".1%"), fmt(x["accuracy"], ".4f"), fmt(y["accuracy"], ".4f"),
                     status + flags))
    width = [max(len(str(r[c])) for r in rows) for c in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, width, strict=True)).rstrip() for r in rows]
    only_a = [i for i in ra if i not in rb]
    only_b = [i for i in rb if i not in ra]
    if only_a:
        lines.append(f"only in A: {', '.join(only_a)}")
    if only_b:
        lines.append(f"only in B: {', '.join(only_b)}")
    if not shared:
        lines.append("no scenario id in common: compare results of the same matrix")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="results folder A (the reference)")
    parser.add_argument("b", help="results folder B")
    args = parser.parse_args()
    try:
        a, b = load(args.a), load(args.b)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"A: {args.a}: {describe(a)}")
    print(f"B: {args.b}: {describe(b)}")
    print("\n".join(compare(a, b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
