"""Argument dataclasses: every flag documented, PaddleNLP example flags parse, bad values refused."""
import dataclasses

import pytest
from paddlenlp.trainer import PdArgumentParser

import argument
from argument import DataArgument, GLMTrainingArguments, TrainModelArgument

OWN_GROUPS = [cls for cls in vars(argument).values()
              if dataclasses.is_dataclass(cls) and cls.__module__ == "argument" and cls is not GLMTrainingArguments]


@pytest.mark.parametrize("cls", OWN_GROUPS, ids=[cls.__name__ for cls in OWN_GROUPS])
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_paddlenlp_example_flags_parse(tmp_path):
    parser = PdArgumentParser((TrainModelArgument, DataArgument, GLMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses([
        "--model_name_or_path", "m", "--task_name_or_path", "d", "--src_length", "64", "--tgt_length", "32",
        "--output_dir", str(tmp_path), "--do_generation", "True", "--lora", "True", "--log_dir", str(tmp_path / "vdl"),
        "--metric_for_best_model", "accuracy", "--max_steps", "3"])
    assert model_args.lora and data_args.src_length == 64 and training_args.do_generation
    assert training_args.logging_dir == str(tmp_path / "vdl")


def test_too_short_lengths_are_refused():
    with pytest.raises(ValueError, match="--src_length"):
        DataArgument(task_name_or_path="d", src_length=2)
