"""MindFormers' ChatGLM2 built from a THUDM-layout config, with the small loops the CPU tests and CPU debugging
need: a few training steps, greedy decoding without the NPU-only paged cache, and MindIR export.

MindFormers' own `generate` needs `ArgMaxExt`, which has no CPU kernel ("The kernel ArgMaxExt unregistered"), and
its KV cache is the paged-attention cache of the Ascend kernels; `greedy_generate` recomputes the prefix each
step instead (fine for tiny models, a debugging aid, not a serving path).
"""
import numpy as np


def build_model(hf_config: dict, seq_length: int, batch_size: int = 1, checkpoint=None):
    """ChatGLM2ForConditionalGeneration (fp32) for a ChatGLM2/3 config.json, weights from `checkpoint` if given."""
    import mindspore as ms
    from mindformers.models.glm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

    config = ChatGLM2Config(
        batch_size=batch_size, num_layers=hf_config["num_layers"], padded_vocab_size=hf_config["padded_vocab_size"],
        hidden_size=hf_config["hidden_size"], ffn_hidden_size=hf_config["ffn_hidden_size"],
        kv_channels=hf_config["kv_channels"], num_attention_heads=hf_config["num_attention_heads"],
        seq_length=seq_length, multi_query_group_num=hf_config["multi_query_group_num"],
        layernorm_epsilon=hf_config["layernorm_epsilon"], rope_ratio=hf_config.get("rope_ratio", 1),
        param_init_type="float32", compute_dtype="float32", layernorm_compute_type="float32",
        rotary_dtype="float32", use_past=False)
    model = ChatGLM2ForConditionalGeneration(config)
    if checkpoint is not None:
        not_loaded, _ = ms.load_param_into_net(model, ms.load_checkpoint(str(checkpoint)))
        missing = [n for n in not_loaded if "paged_attention_mgr" not in n]
        if missing:
            raise KeyError(f"checkpoint lacks {missing}")
    return model


def logits(model, ids: np.ndarray) -> np.ndarray:
    import mindspore as ms

    model.set_train(False)
    return model(ms.Tensor(ids.astype(np.int32)))[0].asnumpy()


def greedy_generate(hf_config: dict, checkpoint, prompt: list, max_new_tokens: int, eos_token_id: int) -> list:
    """Greedy new tokens for one prompt, recomputing the whole sequence per step (no cache)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        model = build_model(hf_config, seq_length=len(ids), checkpoint=checkpoint)
        token = int(logits(model, np.asarray([ids]))[0, -1].argmax())
        if token == eos_token_id:
            break
        ids.append(token)
    return ids[len(prompt):]


def train_steps(model, ids: np.ndarray, labels: np.ndarray, steps: int, learning_rate: float = 1e-2) -> list:
    """Plain MindSpore training steps (AdamWeightDecay) on one batch; returns the losses."""
    import mindspore as ms

    model.set_train(True)
    optimizer = ms.nn.AdamWeightDecay(model.trainable_params(), learning_rate=learning_rate)
    grad_fn = ms.value_and_grad(lambda i, t: model(i, labels=t), None, optimizer.parameters)
    losses = []
    for _ in range(steps):
        loss, grads = grad_fn(ms.Tensor(ids.astype(np.int32)), ms.Tensor(labels.astype(np.int32)))
        optimizer(grads)
        losses.append(float(loss))
    return losses


def export_mindir(model, batch_size: int, seq_length: int, path) -> str:
    import mindspore as ms

    model.set_train(False)
    ms.export(model, ms.Tensor(np.ones((batch_size, seq_length), np.int32)), file_name=str(path), file_format="MINDIR")
    return f"{path}.mindir"
