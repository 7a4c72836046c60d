"""Data for ChatGLM fine-tuning, as the commands and users import it: `from data import read_examples, ...`.

The code lives in `glm_tune/data/` (the library imports it from there, never from this file):
  examples.py        Example, ChatTurn, DataFormatError, IGNORE_INDEX: what readers return and formats take
  records.py         record readers and their checks (JSON lines or a JSON list; the file and line of bad input)
  tool_calls.py      ChatGLM3 tool calls: the tools system message, a call turn, the call parser
  prompt_formats.py  per-generation prompt formats, cutting to lengths, tokenize_example
  collator.py        left-padded batches with each generation's positions and masks

The record contract and the formats read are described in records.py; how each generation tokenizes, and what
is cut to the lengths, in prompt_formats.py.
"""
from glm_tune.data.collator import DataCollator, chatglm_attention_mask, chatglm_position_ids
from glm_tune.data.examples import IGNORE_INDEX, ChatTurn, DataFormatError, Example
from glm_tune.data.prompt_formats import (PROMPT_FORMATS, ChatGLM2Format, ChatGLM3Format, ChatGLMFormat, PromptFormat,
                                          cut_summary, get_prompt_format, tokenize_example)
from glm_tune.data.records import (CONVERSATION_ROLES, DATA_FORMATS, answer_text, check_no_lone_surrogate,
                                   check_regular_file, iter_json_records, read_examples, read_record, read_text_file,
                                   record_to_conversation, record_to_example, task_file)
from glm_tune.data.tool_calls import TOOLS_PREAMBLE, parse_tool_call, tool_call_turn, tools_system_text

__all__ = ["DataCollator", "chatglm_attention_mask", "chatglm_position_ids", "IGNORE_INDEX", "ChatTurn",
           "DataFormatError", "Example", "PROMPT_FORMATS", "ChatGLM2Format", "ChatGLM3Format", "ChatGLMFormat",
           "PromptFormat", "cut_summary", "get_prompt_format", "tokenize_example", "CONVERSATION_ROLES",
           "DATA_FORMATS", "answer_text", "check_no_lone_surrogate", "check_regular_file", "iter_json_records",
           "read_examples", "read_record", "read_text_file", "record_to_conversation", "record_to_example",
           "task_file", "TOOLS_PREAMBLE", "parse_tool_call", "tool_call_turn", "tools_system_text"]
