"""Compare pre-trained sentiment classifiers (and VADER) on phrases and datasets.

    python launch/compare.py --recipe recipes/compare_pretrained.yaml [key=value ...]
    python launch/compare.py --recipe recipes/compare_offline.yaml "models=[runs/x/tuned,vader]" "datasets=[]"

Writes report.md, report.json and PNG plots to output_dir and prints the phrase table.
"""
import cli


def main() -> int:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--recipe", required=True, help="YAML compare recipe (see recipes/compare_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. models=[a,b,vader] datasets=[]")
    args = parser.parse_intermixed_args()  # flags may come after key=value overrides

    # the engine loads only now, after argparse: --help and usage errors answer without importing torch
    from engine.compare import CompareRecipe, compare, phrase_table
    from engine.recipe_yaml import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, schema=CompareRecipe)
    report = compare(recipe)
    if report["phrases"]:
        print(phrase_table(report))
    for d in report["datasets"]:
        accs = ", ".join(f"{name} {r['accuracy']:.3f}" for name, r in d["results"].items())
        print(f"{d['name']} (n={d['n']}) accuracy: {accs}")
    print(f"report: {recipe.output_dir}/report.md, report.json, {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
