"""The MindFormers recipes parse, name only registered classes, carry the published numbers, and refuse what
cannot run; the CPU adaptation changes only device limits; the suite's ADGEN metric in MindFormers' eval loop."""
import copy
import json
from pathlib import Path

import pytest

ASCEND = Path(__file__).resolve().parents[1]

from recipe import (CONFIGS, RecipeError, RecipeOverrides, adapt_to_cpu, devices_needed, load_recipe,
                    unregistered_types)

RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_the_recipes_the_issue_asks_for_are_there():
    assert set(RECIPES) == {"finetune_glm2_6b.yaml", "lora_glm2_6b.yaml", "eval_glm2_6b.yaml",
                            "predict_glm2_6b.yaml", "export_glm2_6b.yaml", "finetune_glm3_32k.yaml",
                            "predict_glm3_32k.yaml"}


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_parses_and_names_only_registered_types(name):
    from mindformers import MindFormerConfig

    config = MindFormerConfig(str(CONFIGS / name))
    assert config.model.arch.type == "ChatGLM2ForConditionalGeneration"
    assert unregistered_types(config) == []
    load_recipe(CONFIGS / name)  # the suite's checks pass on the recipe as shipped


def test_recipe_numbers_are_the_published_ones():
    finetune = load_recipe(CONFIGS / "finetune_glm2_6b.yaml")
    train = finetune.train_dataset
    assert finetune.model.model_config.seq_length == train.max_source_length + train.max_target_length + 1 == 192
    assert finetune.train_dataset_task.dataset_config.max_source_length == 64
    assert devices_needed(finetune) == 8 and finetune.train_dataset.data_loader.version == 2

    lora = load_recipe(CONFIGS / "lora_glm2_6b.yaml").model.model_config.pet_config
    assert (lora.pet_type, lora.lora_rank, lora.lora_alpha) == ("lora", 8, 32)

    evaluate = load_recipe(CONFIGS / "eval_glm2_6b.yaml")
    assert evaluate.model.model_config.seq_length == 256 and evaluate.eval_dataset.data_loader.phase == "eval"
    assert load_recipe(CONFIGS / "predict_glm2_6b.yaml").model.model_config.use_past is True

    glm3 = load_recipe(CONFIGS / "finetune_glm3_32k.yaml")
    model, train, parallel = glm3.model.model_config, glm3.train_dataset, glm3.parallel_config
    assert model.seq_length == train.max_source_length + train.max_target_length + 1 == 32768
    assert model.rope_ratio == 50 and train.max_source_length == 30720
    assert (parallel.data_parallel, parallel.pipeline_stage, devices_needed(glm3)) == (2, 4, 8)
    assert parallel.micro_batch_num >= parallel.pipeline_stage
    assert glm3.processor.tokenizer.type == glm3.train_dataset.tokenizer.type == "ChatGLM3Tokenizer"

    predict3 = load_recipe(CONFIGS / "predict_glm3_32k.yaml")
    model = predict3.model.model_config
    assert (model.seq_length, model.rope_ratio, model.use_past) == (32768, 50, True)
    assert predict3.processor.tokenizer.type == "ChatGLM3Tokenizer"
    shorter = load_recipe(CONFIGS / "predict_glm3_32k.yaml", RecipeOverrides(seq_length=256))
    assert (shorter.model.model_config.seq_length, shorter.model.model_config.max_decode_length) == (256, 256)


def write_variant(tmp_path, name, old, new):
    text = (CONFIGS / name).read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def test_an_unregistered_class_is_refused_before_anything_runs(tmp_path):
    # the optimizer of MindFormers' 1.x GLM2 recipes, gone from 1.9's registry
    path = write_variant(tmp_path, "finetune_glm2_6b.yaml", "type: AdamW", "type: FP32StateAdamWeightDecay")
    with pytest.raises(RecipeError, match="optimizer: FP32StateAdamWeightDecay"):
        load_recipe(path)


def test_seq_length_must_fit_source_plus_target_and_the_length_flags_keep_it_so(tmp_path):
    path = write_variant(tmp_path, "finetune_glm2_6b.yaml", "seq_length: 192", "seq_length: 2048")
    with pytest.raises(RecipeError, match="192 tokens but model seq_length is 2048"):
        load_recipe(path, task="finetune")
    config = load_recipe(path, RecipeOverrides(max_source_length=100, max_target_length=27), task="finetune")
    assert config.model.model_config.seq_length == 128
    assert config.train_dataset_task.dataset_config.max_source_length == 100  # both copies of the section


def fake_model_dir(tmp_path, generation, **sizes):
    folder = tmp_path / generation
    folder.mkdir()
    config = {"padded_vocab_size": 1216, "num_layers": 2, "hidden_size": 128, "ffn_hidden_size": 256,
              "kv_channels": 32, "num_attention_heads": 4, "multi_query_group_num": 2, "layernorm_epsilon": 1e-5,
              "chatglm_generation": generation, **sizes}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(b"")
    (folder / "weights.ckpt").write_bytes(b"")
    return folder


def test_model_dir_sizes_the_model_and_must_match_the_recipes_tokenizer(tmp_path):
    v2 = fake_model_dir(tmp_path, "chatglm2", rope_ratio=1)
    config = load_recipe(CONFIGS / "lora_glm2_6b.yaml",
                         RecipeOverrides(model_dir=str(v2), load_checkpoint=str(v2 / "weights.ckpt")))
    model = config.model.model_config
    assert (model.num_layers, model.hidden_size, model.padded_vocab_size) == (2, 128, 1216)
    assert config.train_dataset.tokenizer.vocab_file == str(v2 / "tokenizer.model")
    assert config.load_checkpoint == str((v2 / "weights.ckpt").resolve())

    v3 = fake_model_dir(tmp_path, "chatglm3", rope_ratio=50)
    with pytest.raises(RecipeError, match="chatglm3 model but the recipe's tokenizer is ChatGLM2Tokenizer"):
        load_recipe(CONFIGS / "finetune_glm2_6b.yaml",
                    RecipeOverrides(model_dir=str(v3), load_checkpoint=str(v3 / "weights.ckpt")))
    with pytest.raises(RecipeError, match="pipeline_stage 4 exceeds num_layers 2"):
        load_recipe(CONFIGS / "finetune_glm3_32k.yaml",
                    RecipeOverrides(model_dir=str(v3), load_checkpoint=str(v3 / "weights.ckpt")))
    glm3 = load_recipe(CONFIGS / "finetune_glm3_32k.yaml", RecipeOverrides(
        model_dir=str(v3), load_checkpoint=str(v3 / "weights.ckpt"), device_target="CPU"))
    assert glm3.model.model_config.rope_ratio == 50 and glm3.parallel_config.pipeline_stage == 1


def test_launching_the_32k_recipe_on_the_wrong_number_of_processes_is_refused(monkeypatch):
    monkeypatch.setenv("MS_WORKER_NUM", "4")
    with pytest.raises(RecipeError, match="= 8 but 4 processes"):
        load_recipe(CONFIGS / "finetune_glm3_32k.yaml")


def test_cpu_adaptation_changes_device_limits_only():
    from mindformers import MindFormerConfig

    config = MindFormerConfig(str(CONFIGS / "finetune_glm3_32k.yaml"))
    before = copy.deepcopy(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    changes = adapt_to_cpu(config)
    after = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    changed_keys = {line.split(":")[0] for line in changes}
    assert changed_keys == {"mode", "max_device_memory dropped (NPU memory pool)", "param_init_type",
                            "compute_dtype", "rotary_dtype", "use_flash_attention", "use_parallel", "parallel_mode",
                            "data_parallel", "pipeline_stage", "micro_batch_num", "sink_mode", "recompute",
                            "select_recompute"}
    for section in ("optimizer", "lr_schedule", "train_dataset", "runner_wrapper", "callbacks", "processor"):
        assert before[section] == after[section], section
    assert before["model"]["model_config"]["seq_length"] == after["model"]["model_config"]["seq_length"]


def test_the_suite_metric_scores_an_empty_answer_zero_where_mindformers_skips_it():
    from mindformers.core.metric.metric import ADGENMetric

    from adgen_metric import SuiteADGENMetric

    preds, labels = ["", "这款连衣裙很好看"], ["这款裙子简约大方", "这款连衣裙很好看"]
    ours, theirs = SuiteADGENMetric(), ADGENMetric()
    for metric in (ours, theirs):
        metric.clear()
        metric.update(preds, labels)
    # hand-checked: the exact answer scores 100 on every measure, the empty one 0
    assert ours.eval() == {"rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0, "bleu-4": 50.0}
    assert theirs.eval()["rouge-1"] == pytest.approx(100.0)
    assert ours.predictions == preds and ours.labels == labels


def test_rank_tables_for_two_servers_number_ranks_across_the_cluster(tmp_path):
    import rank_table

    tables = []
    for server, base in (("10.0.0.1", 1), ("10.0.0.2", 2)):
        conf = tmp_path / f"hccn_{server}.conf"
        conf.write_text("".join(f"address_{d}=192.{base}.{d}.6\nnetmask_{d}=255.255.255.0\n" for d in range(8)))
        path = tmp_path / f"{server}.json"
        rank_table.main(["generate", "--device_num", "[0,8)", "--hccn_conf", str(conf), "--server_id", server,
                         "--output", str(path)])
        tables.append(str(path))
    merged = rank_table.main(["merge", *tables, "--output", str(tmp_path / "cluster.json")])
    assert merged["server_count"] == "2"
    second = merged["server_list"][1]
    assert second["server_id"] == "10.0.0.2"
    assert [(d["device_id"], d["device_ip"], d["rank_id"]) for d in second["device"]][:2] == [
        ("0", "192.2.0.6", "8"), ("1", "192.2.1.6", "9")]
    assert json.loads((tmp_path / "cluster.json").read_text()) == merged


def test_rank_table_refusals_say_what_to_fix(tmp_path):
    import rank_table

    with pytest.raises(rank_table.RankTableError, match="crosses the 0-3 / 4-7"):
        rank_table.parse_device_range("[3,6)")
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.1.0.6\n")
    with pytest.raises(rank_table.RankTableError, match=r"device\(s\) \[1\]"):
        rank_table.generate([0, 1], conf, "10.0.0.1")
    table = rank_table.generate([0], conf, "10.0.0.1")
    with pytest.raises(rank_table.RankTableError, match="more than one table"):
        rank_table.merge([table, table])


def test_data_mindformers_would_silently_drop_stops_the_run_with_file_and_line(tmp_path):
    import tasks
    from data import DataFormatError

    good = tmp_path / "good.json"
    good.write_text('{"content": "类型#裙", "summary": "这款裙子"}\n\n{"content": "类型#裤", "summary": "这款裤子"}\n',
                    encoding="utf-8")
    assert tasks.check_data(good) == 2
    cases = {
        "instruction.json": ('{"content": "a", "summary": "b"}\n{"instruction": "写一句", "output": "好"}\n',
                             r"instruction.json:2: .*missing or empty: \['content', 'summary'\]"),
        "empty_value.json": ('{"content": "a", "summary": "  "}\n', r"empty_value.json:1: .*\['summary'\]"),
        "malformed.json": ('{"content": "a", "summary": "b"}\n{"content": \n', r"malformed.json:2: malformed JSON"),
        "list.json": ('[{"content": "a", "summary": "b"}]', "one JSON list"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataFormatError, match=message):
            tasks.check_data(path)
    with pytest.raises(DataFormatError, match=r"\['input'\]"):
        tasks.check_data(good, columns=("input", "summary"))


def test_resume_points_mindformers_at_the_runs_checkpoint_folder(tmp_path):
    rank = tmp_path / "out" / "checkpoint" / "rank_0"
    rank.mkdir(parents=True)
    (rank / "glm2-6b_rank_0-1_6.ckpt").write_bytes(b"")
    config = load_recipe(CONFIGS / "finetune_glm2_6b.yaml",
                         RecipeOverrides(resume_from_checkpoint=str(rank / "glm2-6b_rank_0-1_6.ckpt")))
    assert (config.load_checkpoint, config.resume_training) == (str(rank.parent), "glm2-6b_rank_0-1_6.ckpt")
    (tmp_path / "loose.ckpt").write_bytes(b"")
    with pytest.raises(RecipeError, match="expected a .ckpt a fine-tune wrote"):
        load_recipe(CONFIGS / "finetune_glm2_6b.yaml", RecipeOverrides(resume_from_checkpoint=str(tmp_path / "x.ckpt")))


def test_a_refused_recipe_does_not_wait_for_the_weight_conversion(tmp_path):
    v2 = fake_model_dir(tmp_path, "chatglm2")  # no weights: converting it would fail with a ConversionError
    path = write_variant(tmp_path, "finetune_glm2_6b.yaml", "seq_length: 192", "seq_length: 2048")
    with pytest.raises(RecipeError, match="seq_length is 2048"):
        load_recipe(path, RecipeOverrides(model_dir=str(v2), output_dir=str(tmp_path / "out")), task="finetune")
    assert not (tmp_path / "out" / "converted").exists()
