"""Label a file of texts with a classifier: a tuned/ or base/ snapshot, an adapter/ folder, or a hub name.

    python launch/predict.py --model runs/demo/tuned --input reviews.txt --output labels.csv
    python launch/predict.py --model runs/demo/adapter --input new.parquet --text-column review --output out.jsonl
    python launch/predict.py --model runs/demo/tuned --input new.csv --keep-columns id --output labels.csv
    torchrun --nproc_per_node=2 launch/predict.py --model runs/demo/tuned --input big.csv --output out.csv

Input: .txt (one text per line, split on "\\n" only) or .csv/.tsv/.jsonl/.parquet (the --text-column).
Output, one row per input text in input order: the --keep-columns, label, its probability, and every
class's probability (CSV columns prob_<class>, or a JSONL `probs` object), by the output's suffix;
it appears only when complete. Texts are cut and scored as the model's run did (its
run_settings.json: max_length, truncation, head_tokens, precision, eval batch size); a flag given
overrides that one setting, and says so.
"""
import json
import os

import cli


def main() -> int:
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--model", required=True, help="snapshot folder, adapter/ folder, hub name or package://pkg/path")
    p.add_argument("--input", required=True, help="texts to label (.txt, .csv, .tsv, .jsonl, .parquet)")
    p.add_argument("--output", required=True, help="where to write the labels (.csv or .jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--base", help="the model an adapter/ goes on (default: its run's base/ beside it, "
                                  "else the one its adapter_config.json names; it must be the base it was trained on)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--keep-columns", type=cli.names, default=(),
                   help="comma-separated input columns copied into the output (e.g. id), so rows join back")
    p.add_argument("--encoding", default="utf-8", type=cli.encoding)
    cli.reading_flags(p, precision_else="auto")
    p.add_argument("--threads", type=cli.count, help="torch threads per process (default: cores / processes)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args()

    # the engine loads only now, after argparse: --help and usage errors answer without importing torch
    from engine.prediction import label_file

    summary = label_file(args.model, args.input, args.output, base=args.base, text_column=args.text_column,
                         keep_columns=args.keep_columns, encoding=args.encoding, max_length=args.max_length,
                         truncation=args.truncation, head_tokens=args.head_tokens, batch_size=args.batch_size,
                         precision=args.precision, overwrite=args.overwrite,
                         trust_remote_code=args.trust_remote_code, num_threads=args.threads)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
