"""Export a GLM2 / ChatGLM3 checkpoint as MindIR: one forward over [batch_size, seq_length] token ids -> logits.

    python ascend/export.py --config ascend/configs/export_glm2_6b.yaml --model_dir ./chatglm2-6b \
        --load_checkpoint glm2_6b.ckpt --output_dir ./export

Writes output_dir/mindir/glm2.mindir (load with mindspore.load + nn.GraphCell, or MindSpore Lite).
"""
from launch import parser_for, run
from recipe import add_seq_length_argument


def main(argv=None):
    parser = parser_for(__doc__, "export_glm2_6b.yaml")
    add_seq_length_argument(parser)

    def body(config, args):
        import tasks

        path = tasks.export(config)
        print(f"wrote {path}")
        return path

    return run(parser, "export", body, argv)


if __name__ == "__main__":
    main()
