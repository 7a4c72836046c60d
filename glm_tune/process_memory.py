"""Peak resident memory of this process, and of every rank of a distributed run.

`resource.getrusage(...).ru_maxrss` is not used: Linux keeps it across exec, so a child started by a big parent
reports the parent's size. /proc/self/status VmHWM belongs to this process image only."""


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def peak_rss_per_rank(world_size: int) -> list:
    """Every rank's peak RSS in MB, in rank order (a collective: all ranks must call it)."""
    if world_size <= 1:
        return [round(peak_rss_mb(), 1)]
    import paddle
    import paddle.distributed as dist

    parts = []
    dist.all_gather(parts, paddle.to_tensor([peak_rss_mb()], dtype="float32"))
    return [round(float(p.item()), 1) for p in parts]
