"""Batch generation with a (fine-tuned) ChatGLM in dygraph; merges tensor-parallel shards when asked.

    python predict_generation.py --model_name_or_path ./checkpoints/chatglm2_sft
    python predict_generation.py --model_name_or_path CKPT --data_file dev.json --output_file predictions.json \
        --src_length 64 --tgt_length 64 --batch_size 8 [--decode_strategy sampling --top_p 0.7 --temperature 0.95]
    python predict_generation.py --model_name_or_path BASE --lora_path OUTPUT_OF_LORA_RUN   # or --prefix_path
    python -m paddle.distributed.launch --nproc_per_node 2 predict_generation.py --model_name_or_path TP_CKPT \
        --merge_tensor_parallel_path ./checkpoints/merged
"""
from glm_tune import console

console.quiet_startup()  # called before the imports below: paddle prints its start-up warnings while it loads

import logging

import paddle

from argument import DygraphPredictArgument, GenerateArgument, LengthArgument, ModelArgument, parse_dataclasses
from glm_tune.errors import run_cli
from glm_tune.model_loading import check_lengths, load_checkpoint, load_config, locate_checkpoint
from glm_tune.safe_output import check_output_dir
from glm_tune.sampling import Sampling
from glm_tune.deployment.predictor import DygraphPredictor, check_predictions_target, load_prompts, report_predictions
from glm_tune.conversion.tp_merge import MERGE_COMMAND, merge_tp_shards

logger = logging.getLogger("predict_generation")


# The flags this command takes, in --help's order (tools/flag_reference.py documents them in docs/flags.md).
ARGUMENT_GROUPS = (ModelArgument, LengthArgument, GenerateArgument, DygraphPredictArgument)


def parse_arguments(argv=None):
    return parse_dataclasses(ARGUMENT_GROUPS, argv)


def check_outputs(model_args, predict_args) -> None:
    """Where this run will write, checked before any model is loaded."""
    check_predictions_target(predict_args.output_file, predict_args.overwrite,
                             {"--data_file": predict_args.data_file, "--model_name_or_path": model_args.model_name_or_path,
                              "--lora_path": model_args.lora_path, "--prefix_path": model_args.prefix_path})
    if predict_args.merge_tensor_parallel_path:
        check_output_dir(predict_args.merge_tensor_parallel_path, MERGE_COMMAND, "--merge_tensor_parallel_path",
                         {"--model_name_or_path": model_args.model_name_or_path}, predict_args.overwrite)


def init_tensor_parallel() -> tuple:
    """(degree, rank): the launcher's world size becomes the tensor-parallel degree."""
    world = paddle.distributed.get_world_size()
    if world <= 1:
        return 1, 0
    from paddle.distributed import fleet

    from glm_tune.training import gloo_rendezvous, tp_cpu_compat

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": world, "pp_degree": 1}
    gloo_rendezvous.install()
    fleet.init(is_collective=True, strategy=strategy)
    tp_cpu_compat.install()
    return world, fleet.get_hybrid_communicate_group().get_model_parallel_rank()


def build_predictor(model_args, data_args, gen_args, predict_args, degree=1, rank=0) -> DygraphPredictor:
    checkpoint = locate_checkpoint(model_args)
    generation = checkpoint.generation
    check_lengths(load_config(checkpoint.folder, generation), data_args.src_length, data_args.tgt_length)
    model, tokenizer = load_checkpoint(checkpoint, tensor_parallel_degree=degree, tensor_parallel_rank=rank,
                                       use_cache=True)
    model.eval()
    return DygraphPredictor(model, tokenizer, generation, src_length=data_args.src_length,
                            max_new_tokens=data_args.tgt_length, batch_size=predict_args.batch_size,
                            sampling=Sampling.from_arguments(gen_args), seed=predict_args.seed)


def main(argv=None):
    console.setup_logging(console.verbose_requested(argv))  # before parsing: PaddleNLP logs while it parses
    model_args, data_args, gen_args, predict_args = parse_arguments(argv)
    check_outputs(model_args, predict_args)
    examples = load_prompts(predict_args.data_file)
    degree, rank = init_tensor_parallel()
    predictor = build_predictor(model_args, data_args, gen_args, predict_args, degree, rank)
    outputs = predictor.predict(examples)
    if rank == 0:
        report_predictions(examples, outputs, predict_args.output_file)
        if predict_args.merge_tensor_parallel_path:
            merged = merge_tp_shards(model_args.model_name_or_path, predict_args.merge_tensor_parallel_path,
                                     predict_args.overwrite, "--merge_tensor_parallel_path")
            logger.info("merged %d shards into %s", degree, merged)
    if degree > 1:
        paddle.distributed.barrier()
    return outputs


if __name__ == "__main__":
    run_cli(main)
