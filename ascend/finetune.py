"""Fine-tune GLM2 / ChatGLM3 / GLM3-32K with a MindFormers recipe (full or LoRA, as the recipe says).

    python ascend/finetune.py --config ascend/configs/finetune_glm2_6b.yaml --model_dir ./chatglm2-6b \
        --train_data AdvertiseGen/train.json --output_dir ./output
    # 8 Ascend cards: msrun --worker_num 8 --local_worker_num 8 ascend/finetune.py ...  (ascend/README.md)

Writes output_dir/checkpoint/rank_*/ (MindFormers' CheckpointMonitor), output_dir/log_history.jsonl (loss per
step) and MindFormers' logs under output_dir/log.
"""
from launch import parser_for, run


def main(argv=None):
    parser = parser_for(__doc__, "finetune_glm2_6b.yaml")
    parser.add_argument("--train_data", help="AdvertiseGen-shaped JSON lines (content/summary)")
    parser.add_argument("--epochs", type=int, help="passes over the data (recipe: runner_config.epochs)")
    parser.add_argument("--learning_rate", type=float, help="peak learning rate (recipe: lr_schedule)")
    parser.add_argument("--save_checkpoint_steps", type=int, help="checkpoint interval (recipe: CheckpointMonitor)")
    parser.add_argument("--keep_checkpoint_max", type=int, help="checkpoints kept (recipe: CheckpointMonitor, 1)")
    parser.add_argument("--resume_from_checkpoint", help="continue an interrupted run from one of its checkpoints "
                        "(output_dir/checkpoint/rank_0/*.ckpt): weights, optimizer, loss scale, step, data position")

    def body(config, args):
        import tasks

        result = tasks.finetune(config)
        losses = result["losses"]
        print(f"trained {len(losses)} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
              f"checkpoint {result['checkpoint']}; losses in {result['log_history']}")
        return result

    return run(parser, "finetune", body, argv)


if __name__ == "__main__":
    main()
