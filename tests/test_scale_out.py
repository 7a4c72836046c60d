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
from glm_tune.training import gloo_rendezvous
from glm_tune.tensor_parallel_layout import ReplicaMismatch, groups_of_rank, merge_qkv, split_qkv

from .test_finetune import batch_logits, finetune_argv, losses
from .test_predict_export import assert_same_weights, predict_argv, split_into_shards

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


# Gloo's rendezvous in this sandbox (gVisor) fails in about a third of the starts with more than 2 processes
# ("pair.cc ... Connection refused" / "TIMEOUT" while Paddle creates its process groups): a fault of the transport,
# reproduced with no code of this suite (tools/gloo_rendezvous_check.py). gloo_rendezvous cuts and retries such a
# rendezvous inside the launch; a launch that still failed in gloo's start, and only such a launch, is run again.
GLOO_START_FAILURES = ("gloo/transport/tcp/pair.cc", "gloo/transport/tcp/unbound_buffer.cc",
                       "TCP connection reset by peer", "gloo could not connect a process group")
RENDEZVOUS_RETRIED = gloo_rendezvous.RETRY_LOG  # a group of this launch was made again
START_ATTEMPTS = 3


def gloo_start_failure(logs: str) -> bool:
    """A launch that failed in gloo's start: a rendezvous error before training, or any failure of a launch whose
    group creation already needed a second rendezvous (seen once: every rank finished, the launcher still
    reported a failure)."""
    return RENDEZVOUS_RETRIED in logs or (any(m in logs for m in GLOO_START_FAILURES) and "train_loss" not in logs)


def with_start_retries(start, outputs, log_dir):
    """Run `start()` (returns (ok, logs)) until it succeeds or fails for another reason than gloo's start."""
    import shutil

    for attempt in range(START_ATTEMPTS):
        ok, logs = start()
        if ok or not gloo_start_failure(logs) or attempt == START_ATTEMPTS - 1:
            assert ok, logs
            return attempt
        print(f"gloo failed to start (attempt {attempt + 1}), retrying", file=sys.stderr)
        for folder in [*outputs, log_dir]:
            shutil.rmtree(folder, ignore_errors=True)


def worker_logs(log_dir) -> str:
    return "".join(p.read_text(errors="replace")[-2500:] for p in sorted(Path(log_dir).rglob("workerlog.*")))


def launch(nproc, script, argv, log_dir, cwd, outputs=()):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir",
           str(log_dir), str(ROOT / script), *map(str, argv)]

    def start():
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
        return proc.returncode == 0, worker_logs(log_dir) + f"\nlauncher exit {proc.returncode}:\n" + (
            proc.stdout + proc.stderr)[-1500:]

    return with_start_retries(start, outputs, log_dir)


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
    assert_same_weights(tiny8(model_type), merge_tp_shards(shards, tmp_path / "merged"))


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


def test_layouts_refused_before_the_distributed_start():
    from argument import ArgumentError, check_layout

    with pytest.raises(ArgumentError, match="3 processes are not a multiple of --tensor_parallel_degree 2"):
        check_layout(2, "", 3)
    with pytest.raises(ArgumentError, match="--sharding stage2 needs GPUs.*use --sharding stage1"):
        check_layout(2, "stage2", 4)
    check_layout(2, "stage1", 4)
    check_layout(4, "", 8)


# ------------------------------------------------------------------------------------- gloo's rendezvous


@pytest.mark.slow
def test_a_peer_that_never_arrives_is_cut_and_the_group_made_again(tmp_path):
    """Process 2 never reaches gloo's rendezvous on its first attempt (it blocks on a socket of its own); the
    others wait for its address. The attempt is cut at the rendezvous bound (15 s), logged, made again, and the
    group then sums every rank's value: in under 30 s, against gloo's 150 s and the store's 900 s unbounded."""
    proc = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "3", "--log_dir",
                           str(tmp_path / "log"), str(ROOT / "tools" / "gloo_rendezvous_check.py"), "--absent_rank",
                           "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text(errors="replace") for p in sorted((tmp_path / "log").glob("workerlog.*")))
    assert proc.returncode == 0, logs[-5000:] + proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in logs.splitlines() if line.startswith('{"rank"')]
    assert sorted(r["rank"] for r in rows) == [0, 1, 2], logs
    for row in rows:
        assert row["ok"] and row["sum"] == 1 + 2 + 3, row
        assert row["seconds"] < 30, row
    assert "simulated: this process never arrived" in logs and RENDEZVOUS_RETRIED in logs


# ------------------------------------------------------------------------------------- 4 CPU ranks (gloo)


@pytest.mark.slow
@pytest.mark.parametrize("model_type,method", [("chatglm2", "full"), ("chatglm3", "lora")])
def test_degree_four_trains_like_the_single_process(model_type, method, tiny8, demo_data, tmp_path):
    """Degree 4 on 2 key/value groups: ranks 0-1 and 2-3 share a group's copy; losses match the single process,
    and the saved weights (merged shards, or the merged LoRA adapter) give its logits. The full run's shards then
    generate under the launcher (merged there by --merge_tensor_parallel_path) exactly as the merged folder does
    in one process: one training launch checks training, checkpoint, merge and generation."""
    common = dict(max_steps=3, save_steps=3, learning_rate=1e-3)
    if method == "lora":
        common.update(lora=True, lora_rank=4, learning_rate=1e-2)
    model_dir = tiny8(model_type)
    single, tp = tmp_path / "single", tmp_path / "tp"
    finetune_generation.main(finetune_argv(model_dir, demo_data, single, **common))
    launch(4, "finetune_generation.py", finetune_argv(model_dir, demo_data, tp, tensor_parallel_degree=4, **common),
           tmp_path / "log", tmp_path, [tp])
    a, b = losses(single), losses(tp)
    assert abs(a[1] - b[1]) <= 1e-6, (a, b)
    for step in (2, 3):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a, b)
    tok = load_tokenizer(str(model_dir), model_type)
    if method == "lora":
        # PaddleNLP saves the adapter of a TP run merged; its lora_B keeps query_key_value's [q | k | v] layout.
        reference = apply_lora(load_model(str(model_dir), model_type), model_type, lora_path=str(single))
        loaded = apply_lora(load_model(str(model_dir), model_type), model_type, lora_path=str(tp / "checkpoint-3"))
        np.testing.assert_allclose(batch_logits(loaded, tok, model_type), batch_logits(reference, tok, model_type),
                                   atol=1e-5)
        return
    assert sorted(p.name for p in tp.glob("model_state.tp*.pdparams")) == [f"model_state.tp0{r}.pdparams"
                                                                          for r in range(4)]
    merged = merge_tp_shards(tp, tmp_path / "merged")
    np.testing.assert_allclose(batch_logits(load_model(str(merged), model_type), tok, model_type),
                               batch_logits(load_model(str(single), model_type), tok, model_type), atol=1e-5)
    merged_by_launch = tmp_path / "merged_by_launch"
    launch(4, "predict_generation.py", predict_argv(tp, merge_tensor_parallel_path=merged_by_launch,
                                                    output_file=tmp_path / "tp.json"), tmp_path / "log2", tmp_path,
           [merged_by_launch])
    assert json.loads((merged_by_launch / "config.json").read_text())["tensor_parallel_degree"] == 1
    assert_same_weights(merged, merged_by_launch)
    predict_generation.main(predict_argv(merged, output_file=tmp_path / "merged.json"))
    assert (tmp_path / "tp.json").read_text() == (tmp_path / "merged.json").read_text()


# ------------------------------------------------------------------------------------- memory plan


def test_memory_plan_counts_chatglm2_6b_by_hand():
    from bench import memory_plan

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
    from bench import memory_plan

    shards = split_into_shards(tiny8("chatglm2"), tmp_path / "tp", degree)
    config = load_config(str(tiny8("chatglm2")), "chatglm2")
    planned = memory_plan.plan("chatglm2", memory_plan.Recipe(degree=degree),
                               memory_plan.full_shapes("chatglm2", config))["params_per_rank"]
    for rank in range(degree):
        state = paddle.load(str(shards / f"model_state.tp{rank:02d}.pdparams"), return_numpy=True)
        assert sum(v.size for n, v in state.items() if not n.endswith(memory_plan.NOT_PARAMETERS)) == planned


# ------------------------------------------------------------------------------------- data x tensor parallel


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(script, argv, log_dir, cwd, outputs=(), nproc_per_node=2):
    """Two `paddle.distributed.launch` "nodes" on this machine, meeting at one --master, as on two hosts."""

    def start():
        master = f"127.0.0.1:{free_port()}"
        procs = []
        for node in range(2):
            cmd = [sys.executable, "-m", "paddle.distributed.launch", "--master", master, "--nnodes", "2", "--rank",
                   str(node), "--nproc_per_node", str(nproc_per_node), "--log_dir", str(log_dir / f"node{node}"),
                   str(ROOT / script), *map(str, argv)]
            procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        outs = [p.communicate(timeout=600)[0] for p in procs]
        return all(p.returncode == 0 for p in procs), "".join(o[-1500:] for o in outs) + worker_logs(log_dir)

    return with_start_retries(start, outputs, log_dir)


DP_TP = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_steps=4, save_steps=2)
SINGLE_OF_DP2 = dict(DP_TP, gradient_accumulation_steps=2)  # the same global batches in one process


@pytest.fixture(scope="session")
def single_of_dp2(tiny8, demo_data, tmp_path_factory):
    """The one-process run every data x tensor parallel launch is checked against, trained once."""
    out = tmp_path_factory.mktemp("single_of_dp2")
    finetune_generation.main(finetune_argv(tiny8("chatglm2"), demo_data, out, **SINGLE_OF_DP2))
    return out


def assert_losses_match(reference, run, tolerance=1e-5):
    a, b = losses(reference), losses(run)
    assert set(b) <= set(a) and b, (a, b)
    for step in b:
        assert abs(a[step] - b[step]) <= tolerance, (step, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["", "stage1"])  # stage2 is GPU-only in Paddle: refused below
def test_data_times_tensor_parallel_matches_and_resumes(sharding, tiny8, demo_data, single_of_dp2, tmp_path):
    """4 processes, --tensor_parallel_degree 2: 2 data-parallel replicas (or sharding ranks) x TP 2. Its global
    batch per step is the single process's two accumulated micro-batches; losses match, and a resume from the
    middle checkpoint continues exactly."""
    model_dir = tiny8("chatglm2")
    single, run, resumed = single_of_dp2, tmp_path / "dp_tp", tmp_path / "resumed"
    extra = dict(tensor_parallel_degree=2, sharding=sharding or None)
    launch(4, "finetune_generation.py", finetune_argv(model_dir, demo_data, run, **DP_TP, **extra),
           tmp_path / "log", tmp_path, [run])
    assert_losses_match(single, run)
    launch(4, "finetune_generation.py", finetune_argv(model_dir, demo_data, resumed, **DP_TP, **extra,
                                                     resume_from_checkpoint=run / "checkpoint-2"),
           tmp_path / "log_resumed", tmp_path, [resumed])
    assert sorted(losses(resumed)) == [3, 4]
    assert_losses_match(run, resumed, 1e-6)


@pytest.mark.slow
def test_two_nodes_train_save_resume_and_merge(tiny8, demo_data, single_of_dp2, tmp_path):
    """Two launchers meeting at one --master (two "nodes" of 2 processes: TP 2 x DP 2) on a shared folder."""
    model_dir = tiny8("chatglm2")
    single, run, resumed = single_of_dp2, tmp_path / "nodes", tmp_path / "resumed"
    launch_two_nodes("finetune_generation.py", finetune_argv(model_dir, demo_data, run, **DP_TP,
                                                             tensor_parallel_degree=2), tmp_path / "log", tmp_path,
                     [run])
    assert_losses_match(single, run)
    launch_two_nodes("finetune_generation.py", finetune_argv(
        model_dir, demo_data, resumed, **DP_TP, tensor_parallel_degree=2,
        resume_from_checkpoint=run / "checkpoint-2"), tmp_path / "log_resumed", tmp_path, [resumed])
    assert_losses_match(run, resumed, 1e-6)
    merged = merge_tp_shards(run, tmp_path / "merged")
    tok = load_tokenizer(str(model_dir), "chatglm2")
    np.testing.assert_allclose(batch_logits(load_model(str(merged), "chatglm2"), tok, "chatglm2"),
                               batch_logits(load_model(str(single), "chatglm2"), tok, "chatglm2"), atol=1e-5)
