"""Make gloo process groups under `paddle.distributed.launch` and time each rendezvous, with the suite's bounded
rendezvous (glm_tune/training/gloo_rendezvous.py) or without it.

    python -m paddle.distributed.launch --nproc_per_node 4 tools/gloo_rendezvous_check.py --groups 20
    python -m paddle.distributed.launch --nproc_per_node 4 tools/gloo_rendezvous_check.py --groups 20 --plain
    python -m paddle.distributed.launch --nproc_per_node 3 tools/gloo_rendezvous_check.py --absent_rank 2

`--absent_rank R`: on its first attempt at the first group, process R never reaches gloo's rendezvous (it blocks on
a socket of its own instead), as a peer lost in the transport would; the others wait for its address. The bounded
rendezvous cuts the attempt, makes the group again and the group then sums correctly.
Each process prints one JSON line per group: {"rank", "group", "seconds", "ok", "error", "sum"}.
"""
import argparse
import json
import os
import socket
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=1, help="how many groups of all processes to make in turn")
    parser.add_argument("--plain", action="store_true",
                        help="Paddle's own new_group, unbounded (a stalled rendezvous waits gloo's 150 s)")
    parser.add_argument("--absent_rank", type=int, default=None,
                        help="this process never arrives at the first attempt of the first group")
    return parser.parse_args(argv)


def absent_on_first_attempt(original_impl):
    """Paddle's process-group constructor, except that its first call for a group after the global one (id 0)
    blocks on a socket pair of its own (never publishing an address) until something shuts the socket down."""
    calls = {"done": False}

    def impl(backend, store, rank, world_size, group_name, pg_options, group_id=0, **kwargs):
        if group_id != 0 and not calls["done"]:
            calls["done"] = True
            left, right = socket.socketpair()
            with left, right:
                left.recv(1)  # returns when the watchdog shuts the attempt's sockets down
            raise RuntimeError("simulated: this process never arrived at the rendezvous")
        return original_impl(backend, store, rank, world_size, group_name, pg_options, group_id, **kwargs)

    return impl


def main(argv=None):
    args = parse_args(argv)
    import paddle
    import paddle.distributed as dist
    from paddle.distributed import collective

    from glm_tune.training import gloo_rendezvous

    paddle.set_device("cpu")
    rank = int(os.environ["PADDLE_TRAINER_ID"])
    if args.absent_rank == rank:
        collective._new_process_group_impl = absent_on_first_attempt(collective._new_process_group_impl)
    if not args.plain:
        gloo_rendezvous.install()
    dist.init_parallel_env()
    world = dist.get_world_size()
    for index in range(args.groups):
        started, error, total = time.monotonic(), None, None
        try:
            group = dist.new_group(list(range(world)))
            value = paddle.to_tensor([float(rank + 1)])
            dist.all_reduce(value, group=group)
            total = float(value.numpy()[0])
        except RuntimeError as err:
            error = str(err).splitlines()[0][:300]
        print(json.dumps({"rank": rank, "group": index, "seconds": round(time.monotonic() - started, 2),
                          "ok": error is None, "error": error, "sum": total}), flush=True)
        if args.plain and error is not None:  # Paddle's own path: barrier through the store before the next one
            key = f"plain/{index}"
            store = collective._default_store
            if store.add(key, 1) >= world:
                store.set(key + "/all", "1")
            store.wait(key + "/all")


if __name__ == "__main__":
    main()
