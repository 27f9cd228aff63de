"""engine.errors: every error the engine raises on purpose, in one module that loads nothing else."""
import json
import subprocess
import sys

from conftest import ROOT


def test_errors_load_without_the_training_stack():
    # the CLIs and the harness name these errors; importing them must not import torch or the engine
    code = ("import json, sys, engine.errors as e; print(json.dumps({'loaded': sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('engine', 'torch', 'transformers')), 'users': [c.__module__ "
            "for c in e.USER_ERRORS + (e.StopTraining, e.MissingPackageError)]}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["loaded"] == ["engine", "engine.errors"]
    assert set(out["users"]) == {"engine.errors"}
