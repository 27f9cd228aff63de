"""Label a file of texts with a classifier: a tuned/ or base/ snapshot, an adapter/ folder, or a hub name.

    python launch/predict.py --model runs/demo/tuned --input reviews.txt --output labels.csv
    python launch/predict.py --model runs/demo/adapter --input new.parquet --text-column review --output out.jsonl
    torchrun --nproc_per_node=2 launch/predict.py --model runs/demo/tuned --input big.csv --output out.csv

Input: .txt (one text per line) or .csv/.tsv/.jsonl/.parquet (the --text-column). Output, one row per
input text in input order: label, its probability, and every class's probability (CSV columns
prob_<class>, or a JSONL `probs` object), by the output's suffix.
"""
import argparse
import json
import os

import cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="snapshot folder, adapter/ folder, hub name or package://pkg/path")
    p.add_argument("--input", required=True, help="texts to label (.txt, .csv, .tsv, .jsonl, .parquet)")
    p.add_argument("--output", required=True, help="where to write the labels (.csv or .jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--base", help="the model an adapter/ goes on (default: the one its adapter_config.json names)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--truncation", default="head", choices=["head", "tail", "head_tail"],
                   help="as data.truncation in the recipe the model was trained with")
    p.add_argument("--head-tokens", type=int, default=128, help="as data.head_tokens (head_tail)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args()

    # the engine loads only now, after argparse: --help and usage errors answer without importing torch
    from engine.prediction import label_file

    summary = label_file(args.model, args.input, args.output, base=args.base, text_column=args.text_column,
                         encoding=args.encoding, max_length=args.max_length, truncation=args.truncation,
                         head_tokens=args.head_tokens, batch_size=args.batch_size, precision=args.precision,
                         overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
                         num_threads=args.threads)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
