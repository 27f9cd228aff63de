"""benchmarks/check_readme.py: every table figure in the docs equals the record its own row names."""
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
BENCH = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _check(*paths) -> "subprocess.CompletedProcess":  # noqa: F821
    return run_cli("benchmarks/check_readme.py", *paths, timeout=120)


def _edited(tmp_path, text, old, new, name="README.md") -> Path:
    assert text.count(old) == 1, old
    path = tmp_path / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def test_the_committed_docs_pass_and_every_doc_is_checked():
    p = _check()  # no argument: README.md, docs/*.md, benchmarks/README.md
    assert p.returncode == 0, p.stderr
    n_docs = 2 + len(list((ROOT / "docs").glob("*.md")))
    assert f"in {n_docs} file(s)" in p.stdout


@pytest.mark.parametrize("old, new, shown", [
    # the three edits the folder-wide checker let through (issue 26, finding 13): each new figure is
    # somewhere in its results folder after some unit scaling, but not in its own row's field
    ("| 1.00x | 4.26 GB |", "| 1.00x | 2.26 GB |", "2.26 GB"),  # a memory peak (cpu_lora_dropout)
    ("| 22.7 M (100%) |", "| 22.7 M (50%) |", "50%"),  # a trainable share (cpu_accuracy)
    ("| 0.45 / 12.7 | 0.04x |", "| 0.45 / 12.7 | 0.4x |", "0.4x"),  # fp16's slowdown (cpu_full levers)
    # two rows' figures swapped: each is in the folder, neither is in its own row's record
    ("| 10.16 | 9.96-10.84 |", "| 10.21 | 9.96-10.84 |", "10.21"),
    # the figures the old checker already caught stay caught
    ("| **0.8707 ± 0.0021** |", "| **0.8706 ± 0.0021** |", "0.8706"),  # an accuracy one digit off
    ("| 12.2 min | 17.4 min |", "| 12.2 min | 17.3 min |", "17.3 min"),  # a whole run (the file: 1042.94 s)
    ("| 15.8 | 2.43 | 29.3% |", "| 15.8 | 2.43 | 29.8% |", "29.8%"),  # an MFU
    ("| 3.8 GB | 0.43 cores |", "| 3.9 GB | 0.43 cores |", "3.9 GB"),  # a metrics.json beside load.json
])
def test_a_figure_not_in_its_own_rows_record_fails(tmp_path, old, new, shown):
    p = _check(_edited(tmp_path, BENCH, old, new))
    assert p.returncode == 1
    assert f"'{shown}'" in p.stderr and "of record '" in p.stderr, p.stderr


def test_the_headline_table_is_checked_row_by_row(tmp_path):
    # the LoRA row's accuracy given to the QLoRA row: a figure of the same folder family, another record
    p = _check(_edited(tmp_path, README, "| 0.9147 ± 0.0018 |", "| 0.9174 ± 0.0018 |"))
    assert p.returncode == 1 and "'0.9174'" in p.stderr and "record 'qlora'" in p.stderr, p.stderr


def test_a_docs_page_is_checked_like_the_readme(tmp_path):
    block = ("<!-- check_readme\nfile: benchmarks/results/cpu_mpnet_vs_minilm/results.json\n"
             "columns: accuracy\nrow: mpnet\n-->\n")
    page = ("# page\n\nFrom [results.md](../benchmarks/results/cpu_mpnet_vs_minilm/results.md):\n\n"
            + block + "| model | tuned accuracy |\n|---|---|\n| all-mpnet-base-v2 | {} |\n")
    (tmp_path / "docs").mkdir()
    good, bad = tmp_path / "docs" / "good.md", tmp_path / "docs" / "bad.md"
    good.write_text(page.format("0.914"), encoding="utf-8")
    bad.write_text(page.format("0.843"), encoding="utf-8")  # MiniLM's accuracy on MPNet's row
    assert _check(good).returncode == 0
    p = _check(bad)
    assert p.returncode == 1 and "'0.843'" in p.stderr and "record 'mpnet'" in p.stderr


def test_a_table_of_figures_must_name_its_record(tmp_path):
    table = "\n\nSome new measurement:\n\n| run | samples/s |\n|---|---|\n| engine | 12.3 |\n"
    (tmp_path / "README.md").write_text(README + table, encoding="utf-8")
    p = _check(tmp_path / "README.md")
    assert p.returncode == 1 and "has no check_readme block" in p.stderr
    marked = table.replace("Some new measurement:", "<!-- check_readme: no measured figures -->")
    (tmp_path / "README.md").write_text(README + marked, encoding="utf-8")
    assert _check(tmp_path / "README.md").returncode == 0


@pytest.mark.parametrize("old, new, says", [
    ("row: lora-dropout-0\n", "", "names 2 row(s), the table has 3"),  # a row without its record
    ("row: lora-dropout-0\n", "row: lora-dropout-0.5\n", "no record 'lora-dropout-0.5'"),
    ("| samples_per_s/full:samples_per_s | peak_memory_bytes*1e-9", "| samples_per_s/full:samples_per_s",
     "column spec(s)"),  # a column left unchecked
    ("| peak_memory_bytes*1e-9\nrow: full", "| peak_memory_byte*1e-9\nrow: full", "no 'peak_memory_byte'"),
])
def test_a_block_that_does_not_fit_its_table_fails(tmp_path, old, new, says):
    p = _check(_edited(tmp_path, BENCH, old, new))
    assert p.returncode == 1 and says in p.stderr, p.stderr


def test_a_results_file_must_be_linked_where_its_figures_are_shown(tmp_path):
    link = "[`results.md`](results/cpu_lora_dropout/results.md)"
    p = _check(_edited(tmp_path, BENCH, link, "`results.md`"))
    assert p.returncode == 1 and "is linked nowhere" in p.stderr, p.stderr
