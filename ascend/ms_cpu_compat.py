"""CPU-only fixes that let MindFormers' ChatGLM2 run on MindSpore's CPU backend (tests and CPU debugging).

1. MindFormers' ChatGLM2RMSNorm uses the fused `RmsNorm` kernel on every device but the Ascend 910A
(`check_rmsnorm_big_kernel_valid`), and MindSpore has no CPU build of it: forward fails with
"Unsupported op [RmsNorm] on CPU" (PyNative: "The kernel RmsNorm unregistered"). MindFormers already carries a
composed RMSNorm (square, mean, rsqrt, mul) for the 910A; `install()` selects that path and adds the `cast` it
forgets to create there.
2. The causal mask reaches CoreAttention as uint8 (1 = masked) and is multiplied by -10000 there; on the CPU
backend the product stays uint8 (-10000 wraps to 240), so future tokens get +240 instead of -10000 and every
position but the last attends ahead (measured: logits off by ~1 except the last position). The mask is cast to
float32 before that multiplication.
3. MindFormers' training cell (MFTrainOneStepCell) checks gradients for overflow with the NPU float-status
registers on every device that is not a GPU: "Unsupported op [NPUGetFloatStatusV2] on CPU", and MindSpore's
fallback `FloatStatus` has no CPU kernel either. On the CPU the check is "is every gradient finite"
(`ops.isfinite`), which is what the status registers report.
4. MindFormers' `generate` takes the greedy token with `mint.argmax` ("The kernel ArgMaxExt unregistered" on CPU);
the CPU has the classic `Argmax` kernel, which gives the same index.
`install()` does nothing unless MindSpore's device is the CPU.
"""
_installed = False


def on_cpu() -> bool:
    import mindspore as ms

    return ms.get_context("device_target") == "CPU"


def install() -> bool:
    global _installed
    if _installed:
        return True
    if not on_cpu():
        return False
    from mindspore.ops import operations as P

    import mindformers.models.glm2.glm2_modules as glm2_modules

    glm2_modules.check_rmsnorm_big_kernel_valid = lambda: False
    original_init = glm2_modules.ChatGLM2RMSNorm.__init__

    def init_with_cast(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if not hasattr(self, "cast"):
            self.cast = P.Cast()

    glm2_modules.ChatGLM2RMSNorm.__init__ = init_with_cast

    import mindspore as ms
    import mindformers.models.glm2.glm2_transformer as glm2_transformer

    original_attention_init = glm2_transformer.CoreAttention.__init__

    def attention_init_with_float_mask(self, *args, **kwargs):
        original_attention_init(self, *args, **kwargs)
        multiply, cast = self.mul_mask, P.Cast()
        self.mul_mask = lambda mask, value: multiply(cast(mask, ms.float32), value)

    glm2_transformer.CoreAttention.__init__ = attention_init_with_float_mask

    from mindspore import ops
    import mindspore.nn.wrap.loss_scale as loss_scale

    def overflow_if_not_finite(self, status, grads):
        return ops.logical_not(ops.stack([ops.isfinite(grad).all() for grad in grads]).all())

    loss_scale.TrainOneStepWithLossScaleCell.get_overflow_status = overflow_if_not_finite

    import mindformers.generation.text_generator as text_generator

    original_generation_init = text_generator.GenerationMixin.__init__

    def generation_init_with_cpu_argmax(self, *args, **kwargs):
        original_generation_init(self, *args, **kwargs)
        self.argmax = lambda logits, dim: ops.Argmax(axis=dim, output_type=ms.int32)(logits)

    text_generator.GenerationMixin.__init__ = generation_init_with_cpu_argmax
    _installed = True
    return True
