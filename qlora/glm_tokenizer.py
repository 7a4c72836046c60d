"""THUDM's ChatGLM2/3 tokenizer semantics as a transformers tokenizer, for GLM-layout folders (no remote code).

A SentencePiece model plus nine special tokens appended after its vocabulary in THUDM's order ([MASK], [gMASK],
[sMASK], sop, eop, <|system|>, <|user|>, <|assistant|>, <|observation|>), exactly as THUDM's ChatGLMTokenizer and
PaddleNLP's ChatGLMv2Tokenizer do, so the ids match the main suite. (A converted "fast" tokenizer does not: it
encodes a lone newline and leading spaces differently from SentencePiece.)
"""
import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>"]


class SentencePieceText:
    """`.encode(text)` as THUDM's SPTokenizer: plain SentencePiece, no special tokens."""

    def __init__(self, processor):
        self.sp_model = processor

    def encode(self, text: str):
        return self.sp_model.encode(text)


class ChatGLMSPTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, padding_side="left", **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.tokenizer = SentencePieceText(self.sp)
        base = self.sp.vocab_size()
        self.special_ids = {t: base + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.special_tokens_by_id = {i: t for t, i in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("pad_token", "<unk>")
        super().__init__(padding_side=padding_side, **kwargs)

    @property
    def vocab_size(self):
        return self.sp.vocab_size() + len(SPECIAL_TOKENS)

    def get_vocab(self):
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}
        vocab.update(self.special_ids)
        return vocab

    def get_command(self, token: str) -> int:
        return self.special_ids[token]

    def _tokenize(self, text, **kwargs):
        pieces = []
        for part in self._split.split(text):
            if part in self.special_ids:
                pieces.append(part)
            elif part:
                pieces.extend(self.sp.encode_as_pieces(part))
        return pieces

    def _convert_token_to_id(self, token):
        return self.special_ids.get(token, self.sp.piece_to_id(token))

    def _convert_id_to_token(self, index):
        if index in self.special_tokens_by_id:
            return self.special_tokens_by_id[index]
        return self.sp.id_to_piece(index) if 0 <= index < self.sp.vocab_size() else self.unk_token

    def convert_tokens_to_string(self, tokens):
        text, run = "", []
        for token in tokens:
            if token in self.special_ids:
                text += self.sp.decode_pieces(run) + token
                run = []
            else:
                run.append(token)
        return text + self.sp.decode_pieces(run)

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        ids = [int(i) for i in token_ids if 0 <= int(i) < self.vocab_size]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.sp.vocab_size() and i not in (self.sp.eos_id(), self.sp.bos_id())]
            return self.sp.decode(ids)
        return self.convert_tokens_to_string([self._convert_id_to_token(i) for i in ids])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        target = os.path.join(save_directory, (filename_prefix or "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
