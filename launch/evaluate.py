"""Evaluate any classifier (a base/ or tuned/ snapshot, or a hub name) on a dataset split.

    python launch/evaluate.py --model runs/demo/tuned --data ../shared/data/imdb [--split test] [--output FILE]
"""
import json
from pathlib import Path

import cli


def main() -> int:
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--model", required=True, help="snapshot folder, hub name or package://pkg/path")
    p.add_argument("--data", required=True, help="data source, as data.source in a recipe")
    p.add_argument("--split", default="test")
    p.add_argument("--output", help="write the metrics JSON here")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--label-names", help="comma-separated class names for string labels, in model order")
    p.add_argument("--max-length", type=cli.count, default=512)
    p.add_argument("--truncation", default="head", choices=["head", "tail", "head_tail"],
                   help="as data.truncation in the recipe the model was trained with")
    p.add_argument("--head-tokens", type=cli.count, default=128, help="as data.head_tokens (head_tail)")
    p.add_argument("--size", type=cli.count, help="evaluate a seeded, stratified subset of this size")
    p.add_argument("--batch-size", type=cli.count, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--encoding", default="utf-8", type=cli.encoding)
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args()
    if args.truncation == "head_tail" and args.head_tokens >= args.max_length:
        p.error(f"--head-tokens ({args.head_tokens}) must be below --max-length ({args.max_length}) "
                f"to leave room for the tail")
    if args.output:  # found out now, not after minutes of scoring
        from engine.paths import uncreatable

        why = "it is a folder" if Path(args.output).is_dir() else uncreatable(Path(args.output).parent)
        if why:
            p.error(f"--output {args.output} cannot be written ({why})")

    # the engine loads only now, after argparse: --help and usage errors answer without importing torch
    from engine.config import DataConfig
    from engine.evaluation import evaluate_pretrained
    from engine.paths import write_json_atomic

    data_cfg = DataConfig(source=args.data, text_column=args.text_column, label_column=args.label_column,
                          max_length=args.max_length, encoding=args.encoding, eval_size=args.size,
                          truncation=args.truncation, head_tokens=args.head_tokens,
                          label_names=args.label_names.split(",") if args.label_names else None)
    metrics = evaluate_pretrained(args.model, data_cfg, args.split, args.batch_size, args.precision,
                                  args.trust_remote_code)
    if args.output:
        write_json_atomic(args.output, metrics)
    print(json.dumps({k: metrics[k] for k in ("model", "data", "n", "accuracy", "f1", "loss", "ece")}, indent=2))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
