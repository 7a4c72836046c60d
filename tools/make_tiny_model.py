"""Write a randomly initialised ChatGLM of a real architecture at a tiny size, with a locally trained tokenizer.

    python tools/make_tiny_model.py --model_type chatglm2 --output_dir build/tiny/chatglm2
    python tools/make_tiny_model.py --model_type chatglm3 --output_dir build/tiny/chatglm3-hf --format hf
    python tools/make_tiny_model.py --model_type chatglm --output_dir DIR --hidden_size 512 --num_layers 4

The architecture is the real one of each generation (v1: 2-D positions, gMASK/sop, GELU, post-LN alpha
scaling; v2/v3: multi-query attention with 2 KV groups, RMSNorm, rotary on half the head, SwiGLU); only the
sizes shrink. The SentencePiece tokenizer is trained on text this project ships (tools/assets) plus the demo
AdvertiseGen data, and carries the real special tokens, so PaddleNLP's own ChatGLM tokenizers load it as they
load THUDM's. `--format paddle` loads with `AutoModelForCausalLM/AutoTokenizer.from_pretrained(DIR)`;
`--format hf` writes the same weights in THUDM's Hugging Face layout (config.json, safetensors, tokenizer).
"""
import argparse
import io
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

import numpy as np

from glm_tune.glm_family import GENERATION_KEY, get_generation
from glm_tune.errors import GlmTuneError, run_cli
from glm_tune.safe_output import atomic_folder, check_output_dir
from tools.make_demo_data import make_record

CORPUS_FILE = Path(__file__).resolve().parent / "assets" / "tokenizer_corpus.txt"

# Special pieces of THUDM's ChatGLM-6B ice_text.model that ChatGLMTokenizer relies on (newline, tab and
# runs of blanks are rewritten into these pieces before SentencePiece sees the text).
V1_SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<n>", "<|tab|>"] + [
    f"<|blank_{n}|>" for n in range(2, 81)
]

# Model sizes: tiny enough for CPU tests, all divisible for tensor parallel degree 2.
DEFAULT_SIZES = {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 256}


CORPORA = ("adgen", "tools")


def tokenizer_corpus(seed: int, num_records: int = 3000, corpus: str = "adgen") -> list:
    """Lines the tokenizer is trained on: shipped text, prompt templates and generated ADGEN records; with "tools"
    in `corpus`, also ChatGLM3 tool-use text (the tools' system message, calls, observations, answers), so that a
    tool conversation takes hundreds of tokens instead of thousands of byte pieces."""
    lines = CORPUS_FILE.read_text(encoding="utf-8").splitlines()
    lines += ["[Round 1]\n\n问：你好\n\n答：你好！", "[Round 2]\n问：谢谢\n答：不客气。"]
    rng = random.Random(seed)
    for _ in range(num_records):
        record = make_record(rng)
        lines += [record["content"], record["summary"]]
    if "tools" in corpus.split(","):
        from data import read_record
        from tools.tool_use_data import tool_record

        for number in range(num_records // 3):
            turns = read_record(tool_record(rng), f"tool corpus {number}").conversation
            lines += [f"{t.metadata}\n{t.content}" for t in (turns if number < 50 else turns[1:])]
    return lines


def train_sentencepiece(model_type: str, output_file: Path, seed: int = 42, vocab_size: int = 1200,
                        corpus: str = "adgen") -> Path:
    """Train the SentencePiece model for `model_type` and write it to `output_file` (deterministic)."""
    import sentencepiece as spm

    lines = tokenizer_corpus(seed, corpus=corpus)
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,  # any character outside the corpus still encodes, as with THUDM's tokenizers
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,  # SentencePiece is deterministic single-threaded
        shuffle_input_sentence=False,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
    )
    if corpus != "adgen":  # the tools' indented JSON: runs of blanks become one piece each
        options.update(allow_whitespace_only_pieces=True)
    if model_type == "chatglm":
        lines = [line.replace("\n", "<n>") for line in lines]
        options.update(pad_id=3, user_defined_symbols=V1_SPECIAL_PIECES)
    else:
        options.update(pad_id=-1, user_defined_symbols=["\n"])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    output_file.write_bytes(model.getvalue())
    return output_file


def build_config(model_type: str, tokenizer, sizes: dict, max_sequence_length: int = 2048):
    """PaddleNLP config of the real architecture at the given sizes, with ids taken from `tokenizer`."""
    generation = get_generation(model_type)
    config_class, _, _ = generation.classes()
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if model_type == "chatglm":
        config = config_class(
            vocab_size=sizes.get("vocab_size") or tokenizer.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=sizes["num_layers"],
            num_attention_heads=heads,
            inner_hidden_size=sizes["ffn_hidden_size"],
            max_sequence_length=max_sequence_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            mask_token_id=tokenizer.mask_token_id,
            gmask_token_id=tokenizer.gmask_token_id,
            num_image_tokens=0,
        )
    else:
        # Real checkpoints pad the vocabulary (64798 -> 65024); a multiple of 64 keeps TP splits even.
        padded_vocab = sizes.get("vocab_size") or -(-tokenizer.vocab_size // 64) * 64
        config = config_class(
            num_hidden_layers=sizes["num_layers"],
            vocab_size=padded_vocab,
            hidden_size=hidden,
            ffn_hidden_size=sizes["ffn_hidden_size"],
            kv_channels=hidden // heads,
            num_attention_heads=heads,
            multi_query_group_num=2,
            max_sequence_length=max_sequence_length,
            add_qkv_bias=True,
            add_bias_linear=False,
            rmsnorm=True,
            post_layer_norm=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if sizes.get("rope_ratio"):
            config.rope_ratio = sizes["rope_ratio"]  # ChatGLM3-6B-32K: rotary base 10000 * rope_ratio
    setattr(config, GENERATION_KEY, model_type)
    return config


_DRAW_ELEMENTS = 1 << 24  # normal values are drawn this many at a time (float64) into the float32 tensor


def initial_value(name: str, shape, rng: np.random.RandomState):
    """A parameter's initial value: Normal(0, 0.02) weights, unit norms, zero biases, as float32 numpy drawn from
    `rng` (in chunks: the draws equal one draw of the whole tensor, without its float64 copy). None for a buffer
    such as rotary `inv_freq`, which keeps the model's value."""
    if name.endswith("inv_freq"):
        return None
    if "layernorm" in name and name.endswith("weight"):
        return np.ones(shape, dtype="float32")
    if name.endswith("bias"):
        return np.zeros(shape, dtype="float32")
    value = np.empty(shape, dtype="float32")
    flat = value.reshape(-1)
    for start in range(0, flat.size, _DRAW_ELEMENTS):
        flat[start:start + _DRAW_ELEMENTS] = rng.normal(0.0, 0.02, size=len(flat[start:start + _DRAW_ELEMENTS]))
    return value


def random_values(seed: int):
    """value_of(name, tensor) for save_hf_checkpoint: each tensor's initial value, made when it is written. The
    draws follow the call order, so it must be called in name order, as random_init draws (checked)."""
    rng, last = np.random.RandomState(seed), [""]

    def value_of(name, tensor):
        if name < last[0]:
            raise RuntimeError(f"random values must be drawn in name order; {name} came after {last[0]}")
        last[0] = name
        value = initial_value(name, tensor.shape, rng)
        return tensor.numpy() if value is None else value

    return value_of


def random_init(model, seed: int) -> None:
    """Set every parameter to its `initial_value`, drawn by numpy in name order so every platform and every
    output format gets bit-identical tensors. Buffers such as rotary `inv_freq` keep their values."""
    import paddle

    rng = np.random.RandomState(seed)
    for name, tensor in sorted(model.state_dict().items()):
        value = initial_value(name, tensor.shape, rng)
        if value is not None:
            tensor.set_value(paddle.to_tensor(value, dtype=tensor.dtype))


def build_tiny_model(model_type: str, seed: int = 42, sizes: dict = None, max_sequence_length: int = 2048,
                     corpus: str = "adgen", lazy: bool = False):
    """(model, tokenizer) of `model_type`, in memory; the tokenizer's files live in a temporary folder until
    saved. `lazy`: the parameters are not allocated (paddle.LazyGuard) and not initialised; write the model with
    save_hf_checkpoint(..., value_of=random_values(seed)), which makes each value as it writes it."""
    import contextlib

    import paddle

    generation = get_generation(model_type)
    _, model_class, tokenizer_class = generation.classes()
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    vocab_dir = Path(tempfile.mkdtemp(prefix="glm_tok_"))
    vocab_file = train_sentencepiece(model_type, vocab_dir / generation.vocab_file, seed,
                                     vocab_size=1200 if corpus == "adgen" else 2000, corpus=corpus)
    extra = {"num_image_tokens": 0} if model_type == "chatglm" else {}
    tokenizer = tokenizer_class(vocab_file=str(vocab_file), **extra)
    config = build_config(model_type, tokenizer, sizes, max_sequence_length)
    paddle.seed(seed)
    with paddle.LazyGuard() if lazy else contextlib.nullcontext():
        model = model_class(config)
    from glm_tune.model_loading import apply_rope_ratio

    apply_rope_ratio(model)
    model.eval()
    if not lazy:
        random_init(model, seed)
    return model, tokenizer


def save_paddle(model, tokenizer, output_dir: Path) -> None:
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))


def make_tiny_model(model_type: str, output_dir, fmt: str = "paddle", seed: int = 42, sizes: dict = None,
                    max_sequence_length: int = 2048, max_shard_size: str = None, overwrite: bool = False,
                    corpus: str = "adgen", dtype: str = "float32") -> Path:
    """Write the tiny model in `fmt` ("paddle" or "hf") to `output_dir`, atomically (a temp folder renamed);
    `dtype` other than float32 only in the Hugging Face layout (the fp32 values rounded once)."""
    if dtype != "float32" and fmt != "hf":
        raise GlmTuneError(f"--dtype {dtype} is written in --format hf only; convert to Paddle with "
                         f"tools/convert_checkpoint.py (the input's dtype is kept)")
    from glm_tune.conversion.hf_layout import save_hf_checkpoint

    output_dir = check_output_dir(output_dir, "make_tiny_model", overwrite=overwrite)
    # The Hugging Face layouts are written tensor by tensor from a model that holds no weights (a 6B's layer
    # shapes fit in memory once); the Paddle layout goes through save_pretrained, which needs them all.
    lazy = fmt != "paddle"
    model, tokenizer = build_tiny_model(model_type, seed, sizes, max_sequence_length, corpus, lazy=lazy)
    values = random_values(seed) if lazy else None
    with atomic_folder(output_dir, "make_tiny_model", overwrite) as staging:
        if fmt == "paddle":
            save_paddle(model, tokenizer, staging)
        elif fmt == "hf":
            save_hf_checkpoint(model, tokenizer, model_type, staging, max_shard_size, value_of=values, dtype=dtype)
        else:  # transformers' GLM layout, through the THUDM layout (the same path real checkpoints take)
            from glm_tune.conversion.hf_glm import save_glm_checkpoint

            save_hf_checkpoint(model, tokenizer, model_type, staging / "hf", value_of=values)
            save_glm_checkpoint(staging / "hf", staging / "glm", max_shard_size=max_shard_size or "2GB")
            for item in (staging / "glm").iterdir():
                os.replace(item, staging / item.name)
            shutil.rmtree(staging / "hf")
            (staging / "glm").rmdir()
    shutil.rmtree(Path(tokenizer.vocab_file).parent, ignore_errors=True)
    return output_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", required=True, choices=["chatglm", "chatglm2", "chatglm3"],
                        help="which ChatGLM generation's architecture and tokenizer to build")
    parser.add_argument("--output_dir", required=True,
                        help="folder to write (an existing one is replaced only if this command wrote it, or with "
                             "--overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output_dir that this command did not write")
    console.add_verbose_flag(parser)
    parser.add_argument("--format", default="paddle", choices=["paddle", "hf", "glm"],
                        help="paddle: PaddleNLP from_pretrained layout; hf: THUDM's Hugging Face layout; glm: "
                             "transformers' GlmForCausalLM layout for qlora/ (v2/v3 only)")
    parser.add_argument("--seed", type=int, default=42, help="seed of weights and tokenizer; same seed, same files")
    parser.add_argument("--hidden_size", type=int, default=DEFAULT_SIZES["hidden_size"], help="model width")
    parser.add_argument("--num_layers", type=int, default=DEFAULT_SIZES["num_layers"], help="transformer blocks")
    parser.add_argument("--num_attention_heads", type=int, default=DEFAULT_SIZES["num_attention_heads"],
                        help="attention heads (v2/v3 keep 2 key/value groups)")
    parser.add_argument("--ffn_hidden_size", type=int, default=DEFAULT_SIZES["ffn_hidden_size"],
                        help="MLP inner width")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="model vocabulary rows (default: the tokenizer's, padded to 64 for v2/v3); e.g. 65024 "
                             "to match the real ChatGLM2 output layer in benchmarks")
    parser.add_argument("--rope_ratio", type=float, default=None,
                        help="v2/v3 only: rotary base multiplier, as ChatGLM3-6B-32K (50) sets it")
    parser.add_argument("--max_sequence_length", type=int, default=2048,
                        help="longest sequence the config allows (src_length + tgt_length must fit)")
    parser.add_argument("--tokenizer_corpus", default="adgen", choices=["adgen", "adgen,tools"],
                        help="text the tokenizer learns its pieces from: the demo ad data, or that plus ChatGLM3 "
                             "tool-use conversations (compact tool prompts; 2,000 pieces)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="hf format only: dtype of the written weights (THUDM ships float16); the float32 "
                             "initial values rounded once")
    parser.add_argument("--max_shard_size", default=None,
                        help="hf format only: split safetensors into shards of at most this size, e.g. 200KB")
    args = parser.parse_args(argv)
    console.setup_logging(args.verbose)
    sizes = {k: getattr(args, k) for k in DEFAULT_SIZES}
    sizes["vocab_size"] = args.vocab_size
    sizes["rope_ratio"] = args.rope_ratio
    out = make_tiny_model(args.model_type, args.output_dir, args.format, args.seed, sizes,
                          args.max_sequence_length, args.max_shard_size, args.overwrite, args.tokenizer_corpus,
                          args.dtype)
    print(f"wrote tiny {args.model_type} ({args.format} layout) to {out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
