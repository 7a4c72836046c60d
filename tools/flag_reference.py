"""docs/flags.md: every flag of the five commands, as their --help has it, written from the same argument
dataclasses the commands parse (so the reference cannot drift: tests/test_docs.py regenerates it and compares).

    python tools/flag_reference.py            # rewrite docs/flags.md
    python tools/flag_reference.py --check    # exit 1 if docs/flags.md is not what the code says
"""
import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "flags.md"
COMMANDS = ("finetune_generation", "predict_generation", "export_generation_model", "infer_generation",
            "serve_generation")
HEADER = """# Every flag of every command

Written by `python tools/flag_reference.py` from the argument dataclasses the commands parse (do not edit by hand;
`tests/test_docs.py` fails when this file and the code disagree). The topical guides explain how the flags work
together: [fine-tuning](fine-tuning.md), [data](data.md), [export and inference](export-and-inference.md),
[serving](serving.md), [scale-out](scale-out.md). Every command also reads its flags from one JSON file
(`python finetune_generation.py args.json`).
"""


def cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def owner(groups, dest: str):
    """The dataclass whose own annotations declare `dest` (PaddleNLP's TrainingArguments for inherited flags)."""
    for group in groups:
        for cls in group.__mro__:
            if dest in getattr(cls, "__annotations__", {}) and dataclasses.is_dataclass(cls):
                return cls
    return None


def command_flags(name: str) -> list:
    """[(flag strings, default, help, declared by)] of one command, in --help's order."""
    from argument import ConsoleArgument, build_parser

    groups = importlib.import_module(name).ARGUMENT_GROUPS
    rows = []
    for action in build_parser(groups)._actions:
        if not action.option_strings or action.dest == "help":
            continue
        cls = owner((*groups, ConsoleArgument), action.dest)
        declared = "PaddleNLP" if cls is not None and cls.__module__.startswith("paddlenlp") else "glm-tune"
        default = "" if action.default in (None, dataclasses.MISSING, argparse.SUPPRESS) else action.default
        rows.append((", ".join(f"`{o}`" for o in action.option_strings), default, action.help or "", declared))
    return rows


def reference() -> str:
    parts = [HEADER]
    for name in COMMANDS:
        rows = command_flags(name)
        own = [r for r in rows if r[3] == "glm-tune"]
        inherited = [r for r in rows if r[3] == "PaddleNLP"]
        parts.append(f"\n## {name}.py\n\n| flag | default | what it does |\n|---|---|---|\n")
        parts += [f"| {flags} | {cell(default)} | {cell(text)} |\n" for flags, default, text, _ in own]
        if inherited:
            parts.append(f"\nPaddleNLP's `TrainingArguments`, which this command takes as they are ({len(inherited)} "
                         "flags; the ones above with the same name override them):\n\n"
                         "| flag | default | what it does |\n|---|---|---|\n")
            parts += [f"| {flags} | {cell(default)} | {cell(text)} |\n" for flags, default, text, _ in inherited]
    return "".join(parts)


def main(argv=None) -> int:
    from glm_tune import console

    console.quiet_startup(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with docs/flags.md instead of writing it")
    args = parser.parse_args(argv)
    text = reference()
    if args.check:
        same = REFERENCE.is_file() and REFERENCE.read_text(encoding="utf-8") == text
        print("docs/flags.md is current" if same else "docs/flags.md is stale: run python tools/flag_reference.py")
        return 0 if same else 1
    REFERENCE.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
