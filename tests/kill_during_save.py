"""Run finetune_generation.py, but kill -9 this process halfway through writing the weights of checkpoint-STEP
(what a power cut or the OOM killer does during a save).

    python tests/kill_during_save.py STEP finetune_generation.py's flags...
"""
import os
import signal
import sys

import paddle  # patched before PaddleNLP binds paddle.save as its default save function

STEP = sys.argv[1]
real_save = paddle.save


def save_then_die(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if f"checkpoint-{STEP}" in str(path) and str(path).endswith("model_state.pdparams"):
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


paddle.save = save_then_die

import finetune_generation

finetune_generation.main(sys.argv[2:])
