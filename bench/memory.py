"""Peak resident memory of this process.

`resource.getrusage(...).ru_maxrss` is not used: Linux keeps it across exec, so a child started by a big parent
reports the parent's size. /proc/self/status VmHWM belongs to this process image only."""


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")
