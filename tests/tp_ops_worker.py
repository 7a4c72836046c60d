"""Run under `paddle.distributed.launch --nproc_per_node 2`: the CPU stand-ins of tp_cpu_compat against the
single-process ops they replace. Writes one JSON line of max differences per rank to argv[1]."""
import json
import sys

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

from glm_tune.training import tp_cpu_compat

strategy = fleet.DistributedStrategy()
strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 2, "pp_degree": 1}
fleet.init(is_collective=True, strategy=strategy)
tp_cpu_compat.install()
group = fleet.get_hybrid_communicate_group().get_model_parallel_group()
rank = group.rank

rng = np.random.RandomState(0)
logits = rng.normal(size=(6, 10)).astype("float32")
labels = np.array([0, 3, 9, 5, -100, 7], dtype="int64")
upstream = rng.normal(size=(6, 1)).astype("float32")

# Reference: the ordinary cross-entropy on the whole vocabulary.
full = paddle.to_tensor(logits, stop_gradient=False)
ref = paddle.nn.functional.cross_entropy(full, paddle.to_tensor(labels)[:, None], ignore_index=-100,
                                         reduction="none")
(ref * paddle.to_tensor(upstream)).sum().backward()

shard = paddle.to_tensor(logits[:, rank * 5:(rank + 1) * 5], stop_gradient=False)
from paddle.distributed.fleet.layers.mpu import mp_ops

loss = mp_ops._c_softmax_with_cross_entropy(shard, paddle.to_tensor(labels), group=group)
(loss * paddle.to_tensor(upstream)).sum().backward()

concat = mp_ops._c_concat(paddle.to_tensor(logits[:, rank * 5:(rank + 1) * 5]), group=group)
result = {
    "loss": float(np.abs(loss.numpy() - ref.numpy()).max()),
    "grad": float(np.abs(shard.grad.numpy() - full.grad.numpy()[:, rank * 5:(rank + 1) * 5]).max()),
    "concat": float(np.abs(concat.numpy() - logits).max()),
}
with open(f"{sys.argv[1]}.{rank}", "w") as f:
    json.dump(result, f)
dist.barrier()
