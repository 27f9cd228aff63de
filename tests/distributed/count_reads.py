"""Under torchrun: run the recipe given as key=value arguments, counting each training step's
device-to-host reads (tests/reads.py); each rank writes {step: [reads]} to $READS_OUT/rank-<rank>.json."""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.finetune import finetune  # noqa: E402
from engine.recipe_yaml import load_recipe  # noqa: E402
from reads import ReadCounter  # noqa: E402

counter = ReadCounter()
with counter.installed():
    finetune(load_recipe(None, sys.argv[1:]))
Path(os.environ["READS_OUT"], f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counter.reads))
