"""Convert LongBench files into AdvertiseGen shape (`content` = filled prompt, `summary` = first answer).

    python tools/longbench_to_adgen.py --input_dir LongBench/data --prompt_config LongBench/config/dataset2prompt.json \
        --output_file data/longbench/dev.json
    python tools/longbench_to_adgen.py --input_dir DIR --prompt_config P.json --output_file OUT --datasets qmsum,vcsum

Each LongBench file `<dataset>.jsonl` holds records with `context`, `input` and `answers` (a list); the prompt
is dataset2prompt.json's template for that dataset filled with the record's fields, as LongBench's own pred.py
and MindFormers' glm32k_preprocess.py build it. The output is written atomically.
"""
import argparse
import json
import string
import sys
from pathlib import Path

from data import DataFormatError, iter_json_records, read_text_file
from glm_tune.errors import run_cli
from glm_tune.safe_output import atomic_write_text, check_output_file


def read_templates(prompt_config) -> dict:
    """dataset -> prompt template from LongBench's dataset2prompt.json."""
    text = read_text_file(prompt_config, "prompt config")
    try:
        templates = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{prompt_config}:{err.lineno}: malformed JSON ({err.msg}); it must be LongBench's "
                              "dataset2prompt.json, an object of dataset name -> prompt template") from None
    if not isinstance(templates, dict):
        raise DataFormatError(f"{prompt_config} holds a JSON {type(templates).__name__}; it must be an object of "
                              "dataset name -> prompt template (LongBench's dataset2prompt.json)")
    return templates


def check_template(template, name: str, prompt_config) -> str:
    """A str.format template whose fields are all named (they are filled from the record's fields)."""
    where = f"{prompt_config}: the template of {name!r}"
    if not isinstance(template, str):
        raise DataFormatError(f"{where} is a {type(template).__name__}, not a string")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise DataFormatError(f"{where} is not a valid format string ({err}); write a literal brace as {{{{ or "
                              "}}") from None
    positional = [f for f in fields if f == "" or f.split(".")[0].split("[")[0].isdigit()]
    if positional:
        raise DataFormatError(f"{where} has the positional field {{{positional[0]}}}; use record field names such "
                              "as {context} and {input}")
    return template


def convert_record(record, template: str, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
        raise DataFormatError(f"{where}: 'answers' must be a non-empty list of strings")
    try:
        content = template.format(**record)
    except KeyError as err:
        raise DataFormatError(f"{where}: the prompt template needs field {err} which the record lacks") from None
    except (IndexError, AttributeError, TypeError, ValueError) as err:
        raise DataFormatError(f"{where}: the prompt template cannot be filled from this record ({err})") from None
    return {"content": content, "summary": answers[0]}


def convert_longbench(input_dir, prompt_config, datasets=None) -> list:
    """AdvertiseGen records for every `<dataset>.jsonl` in `input_dir` (or only `datasets`)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataFormatError(f"--input_dir {input_dir} is not a folder; pass LongBench's data folder")
    templates = read_templates(prompt_config)
    files = [input_dir / f"{name}.jsonl" for name in datasets] if datasets else sorted(input_dir.glob("*.jsonl"))
    if not files:
        raise DataFormatError(f"{input_dir}: no LongBench *.jsonl files found")
    records = []
    for path in files:
        name = path.stem
        if name not in templates:
            raise DataFormatError(f"{prompt_config} has no prompt for dataset {name!r} ({path})")
        if not path.is_file():
            raise DataFormatError(f"{path}: file not found")
        template = check_template(templates[name], name, prompt_config)
        for lineno, record in iter_json_records(path):
            if isinstance(record, DataFormatError):
                raise record
            records.append(convert_record(record, template, f"{path}:{lineno}"))
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder of LongBench <dataset>.jsonl files")
    parser.add_argument("--prompt_config", required=True, help="LongBench's dataset2prompt.json")
    parser.add_argument("--output_file", required=True, help="JSON-lines file to write (AdvertiseGen shape)")
    parser.add_argument("--datasets", default=None, help="comma-separated dataset names (default: every file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_file")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    check_output_file(args.output_file, "--output_file", {"--input_dir": args.input_dir,
                                                          "--prompt_config": args.prompt_config}, args.overwrite)
    records = convert_longbench(args.input_dir, args.prompt_config, datasets)
    atomic_write_text(args.output_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {len(records)} records to {args.output_file}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
