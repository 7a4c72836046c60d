"""THUDM ChatGLM2/3 weights as the GLM model that ships inside `transformers` (`GlmForCausalLM`).

ChatGLM2/3 and transformers' GLM share the architecture: RMSNorm, rotary embedding on the first half of each head
with interleaved pairs, grouped-query attention (ChatGLM's 2 "multi-query groups" are GLM's key/value heads),
SwiGLU with the gate first, no linear biases except on q/k/v. The mapping (torch layouts on both sides):

  transformer.embedding.word_embeddings.weight               -> model.embed_tokens.weight
  transformer.encoder.layers.N.input_layernorm.weight        -> model.layers.N.input_layernorm.weight
  transformer.encoder.layers.N.self_attention.query_key_value.{weight,bias}
        rows [0, H*D) -> self_attn.q_proj, [H*D, H*D+G*D) -> self_attn.k_proj, the rest -> self_attn.v_proj
  transformer.encoder.layers.N.self_attention.dense.weight   -> model.layers.N.self_attn.o_proj.weight
  transformer.encoder.layers.N.post_attention_layernorm.weight -> model.layers.N.post_attention_layernorm.weight
  transformer.encoder.layers.N.mlp.dense_h_to_4h.weight      -> model.layers.N.mlp.gate_up_proj.weight
  transformer.encoder.layers.N.mlp.dense_4h_to_h.weight      -> model.layers.N.mlp.down_proj.weight
  transformer.encoder.final_layernorm.weight                 -> model.norm.weight
  transformer.output_layer.weight                            -> lm_head.weight
  transformer.rotary_pos_emb.inv_freq                        -> (dropped: recomputed from rope_theta)

Config: rope_theta = 10000 * rope_ratio (ChatGLM3-6B-32K sets rope_ratio 50), partial_rotary_factor 0.5,
head_dim = kv_channels, num_key_value_heads = multi_query_group_num. ChatGLM-6B (v1) has no counterpart in
transformers (2-D positions, post-LN alpha scaling): it is not mapped.
"""
import re

import numpy as np

_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def glm_config_dict(hf_chatglm_config: dict) -> dict:
    """transformers GlmConfig arguments for a THUDM ChatGLM2/3 config.json."""
    c = hf_chatglm_config
    if "padded_vocab_size" not in c:
        raise ValueError("only ChatGLM2/3 configs map onto transformers' GLM (ChatGLM-6B has no counterpart)")
    heads = c["num_attention_heads"]
    return {
        "vocab_size": c["padded_vocab_size"],
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["ffn_hidden_size"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": c["multi_query_group_num"] if c.get("multi_query_attention", True) else heads,
        "head_dim": c["kv_channels"],
        "partial_rotary_factor": 0.5,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "max_position_embeddings": c["seq_length"],
        "rms_norm_eps": c["layernorm_epsilon"],
        "rope_theta": 10000.0 * c.get("rope_ratio", 1),
        "attention_bias": c.get("add_qkv_bias", True),
        "pad_token_id": c.get("pad_token_id", 0),
        "eos_token_id": c.get("eos_token_id", 2),
        "tie_word_embeddings": False,
    }


def glm_state_dict(chatglm_tensors: dict, hf_chatglm_config: dict) -> dict:
    """GlmForCausalLM tensors (name -> array) from THUDM ChatGLM2/3 tensors in their Hugging Face layout."""
    cfg = glm_config_dict(hf_chatglm_config)
    q_rows = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = {}
    for name, value in chatglm_tensors.items():
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue
        if name in _TOP:
            out[_TOP[name]] = value
            continue
        match = _LAYER.match(name)
        if not match:
            raise KeyError(f"no GLM counterpart for {name}")
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = np.split(value, [q_rows, q_rows + kv_rows], axis=0)
            out.update({f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                        f"{prefix}self_attn.v_proj.{kind}": v})
        elif rest in _RENAMES:
            out[prefix + _RENAMES[rest]] = value
        else:
            raise KeyError(f"no GLM counterpart for {name}")
    return out


def build_glm_model(chatglm_tensors: dict, hf_chatglm_config: dict):
    """A transformers GlmForCausalLM (float32, eval mode) holding the ChatGLM2/3 weights."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    model = GlmForCausalLM(GlmConfig(**glm_config_dict(hf_chatglm_config)))
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in
             glm_state_dict(chatglm_tensors, hf_chatglm_config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"GLM mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model.eval()


def save_glm_checkpoint(hf_chatglm_dir, output_dir, max_shard_size="2GB", overwrite: bool = False):
    """Write a THUDM ChatGLM2/3 Hugging Face folder as a transformers GLM folder (GlmForCausalLM weights and
    config, the SentencePiece tokenizer for qlora/glm_tokenizer.py), staged and renamed into place."""
    import json
    import shutil
    from pathlib import Path

    from glm_tune.conversion.checkpoint_convert import HFWeights
    from glm_tune.glm_family import GENERATION_KEY, detect_generation
    from glm_tune.conversion.hf_layout import SafetensorsShards
    from glm_tune.safe_output import atomic_folder, check_output_dir

    hf_chatglm_dir, output_dir = Path(hf_chatglm_dir), Path(output_dir)
    inputs = {"--input_dir": hf_chatglm_dir}
    check_output_dir(output_dir, "convert_checkpoint", inputs=inputs, overwrite=overwrite)  # before any read
    generation = detect_generation(hf_chatglm_dir)
    config = json.loads((hf_chatglm_dir / "config.json").read_text(encoding="utf-8"))
    weights = HFWeights(hf_chatglm_dir)
    # The GLM tensors are planned from the mapping applied to empty stand-ins of each input's shape (zero-stride
    # views: no memory), then written one input tensor at a time.
    stand_ins = {n: np.broadcast_to(np.zeros((), weights.dtype(n)), weights.shape(n)) for n in weights.names()}
    plan = [(n, a.shape, a.dtype) for n, a in glm_state_dict(stand_ins, config).items()]
    glm_config = {**glm_config_dict(config), "model_type": "glm", "architectures": ["GlmForCausalLM"],
                  "torch_dtype": config.get("torch_dtype", "float32"), GENERATION_KEY: generation}
    with atomic_folder(output_dir, "convert_checkpoint", overwrite, inputs) as staging:
        shards = SafetensorsShards(staging, plan, max_shard_size)
        for name in weights.names():
            for glm_name, value in glm_state_dict({name: weights.get(name)}, config).items():
                shards.write(glm_name, value)
        shards.close()
        (staging / "config.json").write_text(json.dumps(glm_config, indent=2), encoding="utf-8")
        shutil.copy2(hf_chatglm_dir / "tokenizer.model", staging / "tokenizer.model")
        (staging / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "ChatGLMSPTokenizer", "padding_side": "left", GENERATION_KEY: generation},
            indent=2), encoding="utf-8")
    return output_dir
