"""Argument dataclasses: every flag documented, PaddleNLP example flags parse, bad values refused."""
import dataclasses

import pytest
from paddlenlp.trainer import PdArgumentParser

from argument import DataArgument, GenerateArgument, GLMTrainingArguments, ModelArgument


@pytest.mark.parametrize("cls", [DataArgument, ModelArgument, GenerateArgument])
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_paddlenlp_example_flags_parse(tmp_path):
    parser = PdArgumentParser((ModelArgument, DataArgument, GLMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses([
        "--model_name_or_path", "m", "--task_name_or_path", "d", "--src_length", "64", "--tgt_length", "32",
        "--output_dir", str(tmp_path), "--do_generation", "True", "--lora", "True", "--log_dir", str(tmp_path / "vdl"),
        "--metric_for_best_model", "accuracy", "--max_steps", "3"])
    assert model_args.lora and data_args.src_length == 64 and training_args.do_generation
    assert training_args.logging_dir == str(tmp_path / "vdl")


def test_too_short_lengths_are_refused():
    with pytest.raises(ValueError, match="--src_length"):
        DataArgument(task_name_or_path="d", src_length=2)
