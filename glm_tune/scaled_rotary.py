"""ChatGLM2/3 rotary embedding with a configurable base (ChatGLM3-6B-32K: 10000 * rope_ratio)."""
from paddlenlp.transformers.chatglm_v2.modeling import RotaryEmbedding


class ScaledRotaryEmbedding(RotaryEmbedding):
    def __init__(self, dim: int, base: float):
        super().__init__(dim)
        self.base = base

    def forward(self, max_seq_len, offset=0):
        return self.forward_impl(seq_len=max_seq_len, n_elem=self.dim, base=self.base)
