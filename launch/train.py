"""Fine-tune a classifier from a recipe.

    python launch/train.py --recipe recipes/demo_minilm_imdb.yaml [key.sub=value ...]
    torchrun --nproc_per_node=2 launch/train.py --recipe recipes/X.yaml distributed.strategy=ddp
"""
import cli


def main() -> int:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting a run in output_dir")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from the latest checkpoint in output_dir (auto) or from PATH")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.lr=3e-5")
    args = parser.parse_intermixed_args()  # flags may come after key=value overrides

    # the engine loads only now, after argparse: --help and usage errors answer without importing torch
    from engine.recipe_yaml import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before torch loads: a typo is answered at once
    from engine.finetune import finetune
    from engine.report import summary_table

    report = finetune(recipe, overwrite=args.overwrite, resume=args.resume)
    if report is not None:
        print(summary_table(report))
        print(f"snapshots: {report['base']['path']}  {report['tuned']['path']}; "
              f"metrics: {recipe.output_dir}/metrics.json")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
