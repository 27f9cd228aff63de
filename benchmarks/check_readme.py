"""Check that every figure in the README's tables is in the committed results file the table names.

    python benchmarks/check_readme.py [README.md]

How a table declares its source: the paragraph right above it (the lines between the blank line
before it and the table, e.g. "Every row: [`benchmarks/results/cpu_full/results.md`](...)") links to
one or more files under `benchmarks/results/`. The figures are then looked up in every .json and .md
file of those files' folders (a results folder is one measurement: results.json, results.md,
metrics.json copies, load records).

A table with no digit outside its first column (and outside `code`) holds no figures and needs no
source. Any other table must name one, or say it holds no measured figures with the comment line
`<!-- check_readme: no measured figures -->` right above it (a table of settings, say).

What is checked: every number in every cell but the first column (row labels such as "DDP 2" or
"lr 5e-5" are settings, not measurements) and the header row, outside `code`. A figure matches when
some number in the source folder, rounded to the decimals shown, equals it; a unit after the
figure allows the conversions it implies (% from a fraction, min from seconds, M / k from counts,
GB / GiB / MiB from bytes), and a ratio shown as "1.38x" may be that of two figures in its own row
(each of them checked against the folder). A figure with no match fails the check, naming the README line, the
figure and the folder; the exit code is then 1.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_FIGURES = "<!-- check_readme: no measured figures -->"
LINK = re.compile(r"\(((?:\./)?benchmarks/results/[^)\s#]+)")
# a figure: digits with thousands commas and decimals, then an optional unit
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s?(%|x|min|s|h|GB|GiB|MB|MiB|M|k)?(?![\w.])")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
SCALES = {  # shown = stored x scale
    None: (1,), "x": (1,), "s": (1,), "%": (100, 1), "min": (1 / 60, 1), "h": (1 / 3600,),
    "M": (1e-6,), "k": (1e-3,), "GB": (1e-9, 2**-30, 1e-3, 2**-10), "GiB": (2**-30, 2**-10),
    "MB": (1e-6, 2**-20, 1), "MiB": (2**-20, 1e-6, 1),
}


def tables(lines: list[str]):
    """(first line number, the paragraph right above it, the table's lines) per table."""
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|\s*$", lines[i + 1]):
            start = i
            above = []
            j = i - 1
            while j >= 0 and not lines[j].strip():  # the blank line(s) between paragraph and table
                j -= 1
            while j >= 0 and lines[j].strip() and not lines[j].startswith("|"):
                above.insert(0, lines[j])
                j -= 1
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            yield start + 1, above, lines[start:i]
        else:
            i += 1


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def plain(cell: str) -> str:
    cell = re.sub(r"`[^`]*`", " ", cell)  # code: names and settings, not figures
    cell = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell)  # a link's text only
    return cell.replace("**", "").replace("*", "")


def figures(cell: str) -> list[tuple[float, int, str | None, str]]:
    out = []
    for m in FIGURE.finditer(plain(cell)):
        whole, frac, unit = m.group(1), m.group(2) or "", m.group(3)
        out.append((float(whole.replace(",", "") + frac), max(len(frac) - 1, 0), unit, m.group(0).strip()))
    return out


def folder_numbers(folder: Path) -> list[float]:
    values: list[float] = []

    def walk(o):
        if isinstance(o, bool):
            return
        if isinstance(o, (int, float)):
            values.append(float(o))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for f in sorted(folder.iterdir()):
        if f.suffix == ".json":
            walk(json.loads(f.read_text(encoding="utf-8")))
        elif f.suffix == ".md":
            text = re.sub(r"(?<=\d),(?=\d{3})", "", f.read_text(encoding="utf-8"))
            values += [float(x) for x in NUMBER.findall(text)]
    return values


def found(value: float, decimals: int, unit: str | None, numbers: list[float]) -> bool:
    half = 0.5 * 10.0 ** -decimals + 1e-9
    return any(abs(n * scale - value) <= half for n in numbers for scale in SCALES[unit])


def check(readme: Path) -> list[str]:
    lines = readme.read_text(encoding="utf-8").splitlines()
    problems = []
    cache: dict[Path, list[float]] = {}
    for lineno, above, rows in tables(lines):
        body = [cells(r) for r in rows[2:]]
        has_digits = any(re.search(r"\d", plain(c)) for r in body for c in r[1:])
        sources = sorted({(ROOT / m).resolve().parent for a in above for m in LINK.findall(a)})
        if not sources:
            if has_digits and NO_FIGURES not in above:
                problems.append(f"{readme}:{lineno}: a table with figures names no results file "
                                f"(link one under benchmarks/results/ in the paragraph right above it, "
                                f"or mark it '{NO_FIGURES}')")
            continue
        numbers = []
        for folder in sources:
            if not folder.is_dir():
                problems.append(f"{readme}:{lineno}: source folder {folder.relative_to(ROOT)} does not exist")
                continue
            numbers += cache.setdefault(folder, folder_numbers(folder))
        where = ", ".join(str(f.relative_to(ROOT)) for f in sources)
        for k, row in enumerate(body):
            shown_in_row = [f[0] for cell in row[1:] for f in figures(cell) if f[2] != "x"]
            for cell in row[1:]:
                for value, decimals, unit, shown in figures(cell):
                    if unit == "x" and found(value, decimals, None, [a / b for a in shown_in_row
                                                                   for b in shown_in_row if b]):
                        continue  # a ratio of two figures of its own row, each checked on its own
                    if not found(value, decimals, unit, numbers):
                        problems.append(f"{readme}:{lineno + 2 + k}: '{shown}' (in '{cell}') is not in {where}")
    return problems


def main(argv: list[str]) -> int:
    readme = Path(argv[0]) if argv else ROOT / "README.md"
    problems = check(readme)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} README figure(s) not backed by their results file", file=sys.stderr)
        return 1
    print(f"{readme}: every table figure found in its results file")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
