"""Scale-out (issue 17): tensor parallel past ChatGLM2/3's key/value groups, checked against the single process."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

import finetune_generation
import predict_generation
from glm_tune.conversion.tp_merge import merge_tp_shards
from glm_tune.model_loading import ConfigurationError, apply_lora, check_tensor_parallel, load_config, load_model, \
    load_tokenizer
from glm_tune.tensor_parallel_layout import ReplicaMismatch, groups_of_rank, merge_qkv, split_qkv

from .test_finetune import batch_logits, finetune_argv, losses
from .test_predict_export import predict_argv, split_into_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny8(tmp_path_factory):
    """Tiny ChatGLM2 / ChatGLM3 with 8 query heads in 2 key/value groups (degrees 4 and 8 split them)."""
    from tools.make_tiny_model import make_tiny_model

    root, built = tmp_path_factory.mktemp("tiny8"), {}

    def get(model_type):
        if model_type not in built:
            built[model_type] = make_tiny_model(model_type, root / model_type, sizes={"num_attention_heads": 8})
        return built[model_type]

    return get


def launch(nproc, script, argv, log_dir, cwd):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir",
           str(log_dir), str(ROOT / script), *map(str, argv)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text(errors="replace")[-2500:] for p in sorted(Path(log_dir).glob("workerlog.*")))
    assert proc.returncode == 0, logs
    return proc


# ------------------------------------------------------------------------------------- layout (no processes)


def test_rank_to_group_rule():
    assert [groups_of_rank(2, 4, r)[0] for r in range(4)] == [0, 0, 1, 1]
    assert [groups_of_rank(2, 8, r)[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [list(groups_of_rank(4, 2, r)) for r in range(2)] == [[0, 1], [2, 3]]  # PaddleNLP's own split
    assert list(groups_of_rank(2, 1, 0)) == [0, 1]


def test_qkv_split_by_hand_at_degree_four():
    """Columns named by what they hold: Q heads 0..7 (width 2 each), K groups 0..1, V groups 0..1 (width 2)."""
    hidden, head_dim, groups, degree = 16, 2, 2, 4
    names = [f"q{h}" for h in range(8) for _ in range(2)] + [f"k{g}" for g in range(2) for _ in range(2)] + \
        [f"v{g}" for g in range(2) for _ in range(2)]
    index = {n: i for i, n in enumerate(dict.fromkeys(names))}
    tensor = np.array([[index[n] for n in names]], dtype="float32")
    shard = split_qkv(tensor, hidden, head_dim, groups, degree, rank=2)
    inverse = {i: n for n, i in index.items()}
    assert [inverse[int(v)] for v in shard[0]] == ["q4", "q4", "q5", "q5", "k1", "k1", "v1", "v1"]
    parts = [split_qkv(tensor, hidden, head_dim, groups, degree, r) for r in range(degree)]
    np.testing.assert_array_equal(merge_qkv(parts, hidden, head_dim, groups, degree), tensor)


@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
@pytest.mark.parametrize("degree", [4, 8])
def test_split_then_merge_past_the_kv_groups_is_exact(model_type, degree, tiny8, tmp_path):
    shards = split_into_shards(tiny8(model_type), tmp_path / "tp", degree)
    qkv = paddle.load(str(shards / "model_state.tp00.pdparams"), return_numpy=True)
    name = next(n for n in qkv if n.endswith("layers.0.self_attention.query_key_value.weight"))
    assert qkv[name].shape == (128, 128 // degree + 2 * 16)  # this rank's query heads + one key/value group
    merged = merge_tp_shards(shards, tmp_path / "merged")
    original = paddle.load(str(tiny8(model_type) / "model_state.pdparams"), return_numpy=True)
    result = paddle.load(str(merged / "model_state.pdparams"), return_numpy=True)
    assert set(original) == set(result)
    for key in original:
        np.testing.assert_array_equal(original[key], result[key], err_msg=key)


def test_merge_refuses_key_value_copies_that_differ(tiny8, tmp_path):
    shards = split_into_shards(tiny8("chatglm2"), tmp_path / "tp", 4)
    path = shards / "model_state.tp01.pdparams"  # rank 1 holds a copy of group 0
    state = paddle.load(str(path), return_numpy=True)
    name = next(n for n in state if n.endswith("layers.1.self_attention.query_key_value.weight"))
    state[name][:, 32 + 3] += 0.01  # one key column of the copy
    paddle.save(state, str(path))
    out = tmp_path / "merged"
    with pytest.raises(ReplicaMismatch, match="key projection of key/value group 0 differs.*tp01"):
        merge_tp_shards(shards, out)
    assert not out.exists()


def test_degree_checks_past_the_kv_groups(tiny_dir, tiny8):
    config8 = load_config(str(tiny8("chatglm2")), "chatglm2")
    for degree in (2, 4, 8):
        check_tensor_parallel(config8, "chatglm2", degree)
    with pytest.raises(ConfigurationError, match=r"degree 3 does not divide num_attention_heads=8.*"
                                                 r"multi_query_group_num=2.*use --tensor_parallel_degree 1 or 2 or 4 or 8"):
        check_tensor_parallel(config8, "chatglm2", 3)
    config4 = load_config(str(tiny_dir("chatglm2")), "chatglm2")
    check_tensor_parallel(config4, "chatglm2", 4)
    with pytest.raises(ConfigurationError, match="degree 8 does not divide num_attention_heads=4"):
        check_tensor_parallel(config4, "chatglm2", 8)


# ------------------------------------------------------------------------------------- 4 CPU ranks (gloo)


@pytest.mark.slow
@pytest.mark.parametrize("model_type,method", [("chatglm2", "full"), ("chatglm3", "full"), ("chatglm2", "lora"),
                                               ("chatglm3", "lora")])
def test_degree_four_trains_like_the_single_process(model_type, method, tiny8, demo_data, tmp_path):
    """Degree 4 on 2 key/value groups: ranks 0-1 and 2-3 share a group's copy; losses match the single process,
    and the saved weights (merged shards, or the merged LoRA adapter) give its logits."""
    common = dict(max_steps=3, save_steps=3, learning_rate=1e-3)
    if method == "lora":
        common.update(lora=True, lora_rank=4, learning_rate=1e-2)
    model_dir = tiny8(model_type)
    single, tp = tmp_path / "single", tmp_path / "tp"
    finetune_generation.main(finetune_argv(model_dir, demo_data, single, **common))
    launch(4, "finetune_generation.py", finetune_argv(model_dir, demo_data, tp, tensor_parallel_degree=4, **common),
           tmp_path / "log", tmp_path)
    a, b = losses(single), losses(tp)
    assert abs(a[1] - b[1]) <= 1e-6, (a, b)
    for step in (2, 3):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a, b)
    tok = load_tokenizer(str(model_dir), model_type)
    if method == "lora":
        # PaddleNLP saves the adapter of a TP run merged; its lora_B keeps query_key_value's [q | k | v] layout.
        reference = apply_lora(load_model(str(model_dir), model_type), model_type, lora_path=str(single))
        loaded = apply_lora(load_model(str(model_dir), model_type), model_type, lora_path=str(tp / "checkpoint-3"))
    else:
        reference = load_model(str(single), model_type)
        loaded = load_model(str(merge_tp_shards(tp, tmp_path / "merged")), model_type)
    np.testing.assert_allclose(batch_logits(loaded, tok, model_type), batch_logits(reference, tok, model_type),
                               atol=1e-5)


@pytest.mark.slow
def test_degree_four_checkpoint_generates_and_merges_under_the_launcher(tiny8, demo_data, tmp_path):
    model_dir = tiny8("chatglm2")
    tp = tmp_path / "tp"
    launch(4, "finetune_generation.py", finetune_argv(model_dir, demo_data, tp, tensor_parallel_degree=4,
                                                      max_steps=2, learning_rate=1e-3), tmp_path / "log1", tmp_path)
    assert sorted(p.name for p in tp.glob("model_state.tp*.pdparams")) == [f"model_state.tp0{r}.pdparams"
                                                                          for r in range(4)]
    merged = tmp_path / "merged"
    launch(4, "predict_generation.py", predict_argv(tp, merge_tensor_parallel_path=merged,
                                                    output_file=tmp_path / "tp.json"), tmp_path / "log2", tmp_path)
    assert json.loads((merged / "config.json").read_text())["tensor_parallel_degree"] == 1
    predict_generation.main(predict_argv(merged, output_file=tmp_path / "merged.json"))
    assert (tmp_path / "tp.json").read_text() == (tmp_path / "merged.json").read_text()


# ------------------------------------------------------------------------------------- memory plan


def test_memory_plan_counts_chatglm2_6b_by_hand():
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_plan

    shapes_config = memory_plan.full_shapes("chatglm2")
    h, ffn, vocab, layers, kv = 4096, 13696, 65024, 28, 2 * 128 * 2
    layer = (h * (h + kv) + h + kv) + h * h + h * 2 * ffn + ffn * h + 2 * h
    assert memory_plan.plan("chatglm2", memory_plan.Recipe(), shapes_config)["params_per_rank"] == \
        2 * vocab * h + layers * layer + h == 6_243_584_000  # THUDM's "6.2B"
    # TP 4 past the 2 groups: a quarter of the query heads and of everything split, plus one group's K and V.
    qkv4 = h * (h // 4 + 2 * 128) + h // 4 + 2 * 128
    layer4 = qkv4 + h * h // 4 + h * 2 * ffn // 4 + ffn * h // 4 + 2 * h
    tp4 = memory_plan.plan("chatglm2", memory_plan.Recipe(degree=4), shapes_config)
    assert tp4["params_per_rank"] == 2 * vocab * h // 4 + layers * layer4 + h
    # bf16 full fine-tuning: 2 (weights) + 2 (grads) + 12 (fp32 master + moments) bytes per parameter
    assert tp4["weights"] + tp4["grads"] + tp4["optimizer"] == 16 * tp4["params_per_rank"]
    stage2 = memory_plan.plan("chatglm2", memory_plan.Recipe(degree=2, data_parallel=2, sharding=2), shapes_config)
    tp2 = memory_plan.plan("chatglm2", memory_plan.Recipe(degree=2), shapes_config)
    assert stage2["optimizer"] == tp2["optimizer"] / 2 and stage2["grads"] == tp2["grads"] / 2


@pytest.mark.parametrize("degree", [2, 4, 8])
def test_memory_plan_split_rules_match_real_shards(degree, tiny8, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_plan

    shards = split_into_shards(tiny8("chatglm2"), tmp_path / "tp", degree)
    config = load_config(str(tiny8("chatglm2")), "chatglm2")
    planned = memory_plan.plan("chatglm2", memory_plan.Recipe(degree=degree),
                               memory_plan.full_shapes("chatglm2", config))["params_per_rank"]
    for rank in range(degree):
        state = paddle.load(str(shards / f"model_state.tp{rank:02d}.pdparams"), return_numpy=True)
        assert sum(v.size for n, v in state.items() if not n.endswith(memory_plan.NOT_PARAMETERS)) == planned
