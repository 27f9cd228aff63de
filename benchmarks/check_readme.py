"""Check that every measured figure in the docs' tables equals the field of the record its own row names.

    python benchmarks/check_readme.py            # README.md, docs/*.md and benchmarks/README.md
    python benchmarks/check_readme.py FILE ...   # those files only

A table of measurements carries, right above it (blank lines between allowed), a comment block that
says where each of its figures comes from:

    <!-- check_readme
    file: benchmarks/results/cpu_lora_dropout/results.json
    columns: samples_per_s | samples_per_s_range.0 samples_per_s_range.1 | samples_per_s/full:samples_per_s
    row: full
    row: lora-dropout-0.1
    -->

- `file:` one or more JSON files (paths from the repository root). A results.json contributes one
  record per entry of its `records`, named by its `id`; any other JSON file is one record named by its
  file name without `.json` (`full-r1-metrics`, `load`). `PATH as NAME` names that file's records
  `ID@NAME` (or the whole file `NAME`), for two files that hold the same ids. Each file's folder must also be linked
  (a markdown link) somewhere in the same document, so a reader sees the provenance too.
- `row:` one per body row, in order: the row's record, then optional `name=value` words that fill
  `{name}` in the column specs; then optionally `| spec | spec ...` replacing `columns:` for that row.
  `row: -` is a row without figures.
- `columns:` one spec per column after the first (the first column is the row's label), separated by
  `|`. `-` is a column without figures. Otherwise a spec is one expression per figure in the cell, in
  reading order, separated by spaces. An expression is `path`, `record:path`, numbers, `*`, `/`,
  parentheses and `sqrt(...)`; a path is keys and list indices joined by `.` (`tuned.accuracy`,
  `repeats.1.samples_per_s`), a key holding `.` or `/` in brackets (`results[vader].accuracy`). The
  unit scaling is written out: a peak in bytes shown in GB is `peak_memory_bytes*1e-9`, a fraction
  shown in % is `mfu*100`, seconds shown in minutes `wall_seconds/60`, a ratio `a/b`.

A figure matches when its expression's value rounds to it at the decimals shown (0.5 in the last
shown digit). A cell with more figures than expressions, a row or column count that disagrees, a
record or path that does not exist, fail the check, each naming the file and line; the exit code is
then 1. A table with no digit outside its first column and outside `code` holds no figures and needs
no block; a table of settings says so with `<!-- check_readme: no measured figures -->` right above it.
Figures in prose and in a table's first column are not checked.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_FIGURES = "<!-- check_readme: no measured figures -->"
BLOCK_START = "<!-- check_readme"
# a figure: digits with thousands commas and decimals, then an optional unit (shown, not used to scale)
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s?(%|x|min|s|h|GB|GiB|MB|MiB|M|k)?(?![\w.])")
TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e-?\d+)?)(?![\w.:\[])|(?P<op>[*/(),])|"
                   r"(?P<path>(?:[\w.\-:@]|\[[^\]]*\])+))")
LINK_TARGET = re.compile(r"\]\(([^)\s]+)\)")


class SpecError(ValueError):
    """A check_readme block that cannot be read or points at nothing."""


def default_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def tables(lines: list[str]):
    """(first line number, the non-blank lines right above it, the table's lines) per table."""
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|\s*$", lines[i + 1]):
            start = i
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            above = []
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


def figures(cell: str) -> list[tuple[float, int, str]]:
    """(value, decimals shown, the figure as shown) per figure in the cell."""
    out = []
    for m in FIGURE.finditer(plain(cell)):
        whole, frac = m.group(1), m.group(2) or ""
        out.append((float(whole.replace(",", "") + frac), max(len(frac) - 1, 0), m.group(0).strip()))
    return out


def block(above: list[str]) -> list[str] | None:
    """The check_readme block's lines when it ends right above the table, else None."""
    if not above or above[-1].strip() != "-->":
        return None
    for k in range(len(above) - 1, -1, -1):
        if above[k].strip().startswith(BLOCK_START):
            return [ln.strip() for ln in above[k + 1:-1]]
    return None


def load_records(files: list[str], aliases: dict[str, str]) -> dict[str, object]:
    records: dict[str, object] = {}
    for name in files:
        path = ROOT / name
        if not path.is_file():
            raise SpecError(f"results file {name} does not exist")
        data = json.loads(path.read_text(encoding="utf-8"))
        alias = aliases.get(name)
        if isinstance(data, dict) and isinstance(data.get("records"), list):
            found = {r["id"] + (f"@{alias}" if alias else ""): r
                     for r in data["records"] if isinstance(r, dict) and "id" in r}
        else:
            found = {alias or path.stem: data}
        for rid, rec in found.items():
            if rid in records:
                raise SpecError(f"record '{rid}' is in more than one file of the block "
                            f"(name a file's records apart: 'file: PATH as NAME' makes them ID@NAME)")
            records[rid] = rec
    return records


def lookup(record: object, path: str) -> float:
    node = record
    for key in re.findall(r"\[([^\]]*)\]|([^.\[\]]+)", path):
        key = key[0] or key[1]
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise SpecError(f"no '{key}' in path '{path}'")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise SpecError(f"'{path}' is {node!r}, not a number")
    return float(node)


def evaluate(expr: str, records: dict[str, object], row_record: str) -> float:
    tokens = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise SpecError(f"cannot read '{expr[pos:]}' in '{expr}'")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()

    def operand(i: int) -> tuple[float, int]:
        kind, text = tokens[i]
        if kind == "num":
            return float(text), i + 1
        if text == "(":
            v, i = product(i + 1)
            return v, expect(i, ")")
        if kind == "path" and text == "sqrt" and i + 1 < len(tokens) and tokens[i + 1][1] == "(":
            v, i = product(i + 2)
            return math.sqrt(v), expect(i, ")")
        if kind == "path":
            head = text.split("[")[0]
            rid, path = (head.rsplit(":", 1)[0], text[len(head.rsplit(":", 1)[0]) + 1:]) if ":" in head \
                else (row_record, text)
            if rid not in records:
                raise SpecError(f"no record '{rid}' in the block's files")
            return lookup(records[rid], path), i + 1
        raise SpecError(f"unexpected '{text}' in '{expr}'")

    def expect(i: int, text: str) -> int:
        if i >= len(tokens) or tokens[i][1] != text:
            raise SpecError(f"missing '{text}' in '{expr}'")
        return i + 1

    def product(i: int) -> tuple[float, int]:
        v, i = operand(i)
        while i < len(tokens) and tokens[i][1] in "*/":
            w, j = operand(i + 1)
            v = v * w if tokens[i][1] == "*" else v / w
            i = j
        return v, i

    value, end = product(0)
    if end != len(tokens):
        raise SpecError(f"cannot read '{expr}'")
    return value


def expressions(spec: str) -> list[str]:
    """A cell's spec -> one expression per figure: split on spaces outside brackets and parentheses."""
    out, depth, cur = [], 0, ""
    for ch in spec.strip():
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch.isspace() and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + ([cur] if cur else [])


def fill(spec: str, subst: dict[str, str]) -> str:
    """A column spec with the row's `{name}`s replaced by its `name=value` words."""
    return re.sub(r"\{(\w+)\}", lambda m: subst.get(m.group(1), m.group(0)), spec)


def parse_block(lines: list[str]):
    """-> (files, {file: alias}, columns, rows)."""
    files, aliases, columns, rows = [], {}, None, []
    for ln in lines:
        key, _, rest = ln.partition(":")
        if key == "file":
            words = rest.split()
            for k, w in enumerate(words):
                if w == "as" and 0 < k < len(words) - 1:
                    aliases[words[k - 1]] = words[k + 1]
                elif k == 0 or words[k - 1] != "as":
                    files.append(w)
        elif key == "columns":
            columns = [c.strip() for c in rest.split("|")]
        elif key == "row":
            head, *override = rest.split("|")
            words = head.split()
            if not words:
                raise SpecError("a 'row:' without a record")
            subst = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            rows.append((words[0], subst, [c.strip() for c in override] or None))
        elif ln:
            raise SpecError(f"unknown line '{ln}' (file:, columns:, row:)")
    if not files:
        raise SpecError("no 'file:' line")
    return files, aliases, columns, rows


def check_table(doc: Path, text: str, lineno: int, spec: list[str], body: list[list[str]]) -> list[str]:
    where = f"{doc}:{lineno}"
    try:
        files, aliases, columns, rows = parse_block(spec)
        records = load_records(files, aliases)
    except (SpecError, json.JSONDecodeError) as e:
        return [f"{where}: check_readme block: {e}"]
    problems = []
    for name in files:
        folder = str(Path(name).parent)
        tail = folder.split("benchmarks/", 1)[-1]  # results/X: linked as benchmarks/results/X or ../results/X
        if not any(tail in t for t in LINK_TARGET.findall(text)):
            problems.append(f"{where}: {name} is named for this table but {folder}/ is linked nowhere in {doc.name}")
    if len(rows) != len(body):
        return problems + [f"{where}: the block names {len(rows)} row(s), the table has {len(body)}"]
    for k, (row, (rid, subst, override)) in enumerate(zip(body, rows, strict=True)):
        at = f"{doc}:{lineno + 2 + k}"
        specs = override or columns
        if rid == "-":
            specs = ["-"] * (len(row) - 1)
        if specs is None or len(specs) != len(row) - 1:
            problems.append(f"{at}: the block gives {0 if specs is None else len(specs)} column spec(s), "
                            f"the row has {len(row) - 1} columns after its label")
            continue
        if rid != "-" and rid not in records:
            problems.append(f"{at}: no record '{rid}' in {', '.join(files)}")
            continue
        for cell, cell_spec in zip(row[1:], specs, strict=True):
            shown = figures(cell)
            exprs = [] if cell_spec == "-" else expressions(fill(cell_spec, subst))
            if len(shown) > len(exprs):
                problems.append(f"{at}: '{shown[len(exprs)][2]}' (in '{cell}') has no field in the block")
                continue
            for (value, decimals, as_shown), expr in zip(shown, exprs, strict=False):  # '–': nothing shown
                try:
                    actual = evaluate(expr, records, rid)
                except (SpecError, ZeroDivisionError) as e:
                    problems.append(f"{at}: '{as_shown}' (in '{cell}'): {e}")
                    continue
                if abs(actual - value) > 0.5 * 10.0 ** -decimals + 1e-9:
                    problems.append(f"{at}: '{as_shown}' (in '{cell}') is not {expr} of record '{rid}' "
                                    f"in {', '.join(files)} (that is {actual:.6g})")
    return problems


def check(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    lines = text.splitlines()
    problems = []
    for lineno, above, table in tables(lines):
        body = [cells(r) for r in table[2:]]
        spec = block(above)
        if spec is not None:
            problems += check_table(doc, text, lineno, spec, body)
        elif any(re.search(r"\d", plain(c)) for r in body for c in r[1:]) and NO_FIGURES not in above:
            problems.append(f"{doc}:{lineno}: a table with figures has no check_readme block naming its "
                            f"results file (or mark it '{NO_FIGURES}')")
    return problems


def main(argv: list[str]) -> int:
    docs = [Path(a) for a in argv] or default_files()
    problems = []
    for doc in docs:
        if not doc.is_file():
            problems.append(f"{doc}: no such file")
            continue
        problems += check(doc)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} table figure(s) not backed by their own row's record", file=sys.stderr)
        return 1
    print(f"every table figure in {len(docs)} file(s) equals its row's record")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
