"""What the four launchers share: their flags, loading the recipe, and turning known failures into one-line errors."""
import argparse
import json
import sys

from recipe import RecipeError, add_recipe_arguments, describe, load_recipe, overrides_from_args


def parser_for(doc: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser, default_config)
    return parser


def run(parser: argparse.ArgumentParser, task: str, body, argv=None):
    """Parse, load and check the recipe for `task`, print what will run, then `body(config, args)`."""
    from glm_tune.conversion.checkpoint_convert import ConversionError
    from data import DataFormatError

    args = parser.parse_args(argv)
    try:
        config = load_recipe(args.config, overrides_from_args(args), task)
        print(json.dumps({"task": task, "recipe": args.config, **describe(config)}, default=str), flush=True)
        return body(config, args)
    except (RecipeError, DataFormatError, ConversionError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
