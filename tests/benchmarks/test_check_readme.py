"""benchmarks/check_readme.py: the README's table figures are in the results files they name."""
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _check(path) -> "subprocess.CompletedProcess":  # noqa: F821
    return run_cli("benchmarks/check_readme.py", path, timeout=120)


def test_the_committed_readme_passes():
    p = _check(ROOT / "README.md")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("old, new, shown", [
    ("| **0.8707 ± 0.0021** |", "| **0.8706 ± 0.0021** |", "0.8706"),  # an accuracy one digit off
    ("| 12.2 min | 17.4 min |", "| 12.2 min | 17.3 min |", "17.3 min"),  # a whole run (the file: 1042.94 s)
    ("| 15.8 | 2.43 | 29.3% |", "| 15.8 | 2.43 | 29.8% |", "29.8%"),  # a percentage
    ("| 3.8 GB | 4.1 GB |", "| 3.9 GB | 4.1 GB |", "3.9 GB"),  # a memory peak in another folder
])
def test_a_figure_not_in_its_file_fails_loudly(tmp_path, old, new, shown):
    assert README.count(old) == 1, old
    (tmp_path / "README.md").write_text(README.replace(old, new), encoding="utf-8")
    p = _check(tmp_path / "README.md")
    assert p.returncode == 1
    assert f"'{shown}'" in p.stderr and "is not in benchmarks/results/" in p.stderr


def test_a_table_of_figures_must_name_its_file(tmp_path):
    table = "\n\nSome new measurement:\n\n| run | samples/s |\n|---|---|\n| engine | 12.3 |\n"
    (tmp_path / "README.md").write_text(README + table, encoding="utf-8")
    p = _check(tmp_path / "README.md")
    assert p.returncode == 1 and "names no results file" in p.stderr
    marked = table.replace("Some new measurement:", "<!-- check_readme: no measured figures -->")
    (tmp_path / "README.md").write_text(README + marked, encoding="utf-8")
    assert _check(tmp_path / "README.md").returncode == 0
