"""Evaluate any classifier (a base/ or tuned/ snapshot, an adapter/ folder, or a hub name) on labelled rows.

    python launch/evaluate.py --model runs/demo/tuned [--output FILE]
    python launch/evaluate.py --model runs/demo/tuned --data ../shared/data/imdb --split test [--size 1000]

A run's snapshot carries how its run read text and which rows it scored (run_settings.json): with
no data flags the rows of its metrics.json's base and tuned figures (data.test_split, else the eval
split or the held-out rows) are scored as the run scored them (cut, precision, eval batch size),
reproducing those figures. A flag given overrides that one setting, and says so: --split of the
run's eval or test split with --size N takes the subset a run with that size took (its seed);
another split, or another --data source, is read whole, or a seeded --size subset. A model without
run settings (a hub name) needs --data; a single-file source is one split (all its rows).
"""
import json
from pathlib import Path

import cli


def main() -> int:
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--model", required=True, help="snapshot folder, adapter/ folder, hub name or package://pkg/path")
    p.add_argument("--base", help="the model an adapter/ goes on (as launch/predict.py --base)")
    p.add_argument("--data", help="data source, as data.source in a recipe (default: the run's)")
    p.add_argument("--split", help="default: the split the run's figures are on, else test")
    p.add_argument("--size", type=cli.count, help="a seeded, stratified subset of this size")
    p.add_argument("--output", help="write the metrics JSON here")
    p.add_argument("--text-column", help="default: the run's data.text_column, else text")
    p.add_argument("--label-column", help="default: the run's data.label_column, else label")
    p.add_argument("--label-names", type=cli.names,
                   help="comma-separated class names for string labels, in model order")
    cli.reading_flags(p, precision_else="fp32")
    p.add_argument("--encoding", type=cli.encoding, help="default: the run's data.encoding, else utf-8")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args()
    if args.output:  # found out now, not after minutes of scoring
        from engine.paths import uncreatable

        why = "it is a folder" if Path(args.output).is_dir() else uncreatable(Path(args.output).parent)
        if why:
            p.error(f"--output {args.output} cannot be written ({why})")

    # the engine loads only now, after argparse: --help and usage errors answer without importing torch
    from engine.evaluation import evaluate_saved
    from engine.paths import write_json_atomic
    from engine.run_settings import RowsAsked

    rows = RowsAsked(source=args.data, split=args.split, size=args.size, text_column=args.text_column,
                     label_column=args.label_column, encoding=args.encoding,
                     label_names=list(args.label_names) if args.label_names else None)
    asked = {"max_length": args.max_length, "truncation": args.truncation, "head_tokens": args.head_tokens,
             "batch_size": args.batch_size, "precision": args.precision}
    metrics = evaluate_saved(args.model, rows, asked, base=args.base, trust_remote_code=args.trust_remote_code)
    if args.output:
        write_json_atomic(args.output, metrics)
    keys = ("model", "data", "split", "n", "accuracy", "f1", "loss", "ece", "read_as")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
