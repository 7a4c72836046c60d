"""Gloo process groups on CPU whose failed rendezvous costs seconds, not minutes, and is made again.

Why: in our CPU sandbox (gVisor) gloo's full-mesh connect fails in about a third of the rendezvous of 4 processes
("pair.cc:784 connect ... Connection refused", then on the rank left waiting "pair.cc:914 TIMEOUT"), with no code of
this suite involved (`new_group` in a loop reproduces it: tools/gloo_rendezvous_check.py). Paddle 3.3.1 gives no
handle on gloo's own waits: `ProcessGroupGloo.create(store, rank, size, gid)` builds a gloo context whose pair
timeout is fixed (a stalled rank waits 150 s, measured) and whose address exchange waits on the TCPStore (900 s by
default), and no flag or environment variable changes either. So the bound is put around the call instead:

* each attempt exchanges addresses through its own TCPStore client, so its waits can be cut without touching the
  global store Paddle and the Trainer keep using;
* `ProcessGroupGloo.create` releases the GIL while it waits, so a watchdog thread runs beside it: when any member
  reports a failed attempt, or the attempt outlasts `GLM_TUNE_GLOO_RENDEZVOUS_SECONDS` (15 s; a healthy one takes
  about 1 s), it shuts down the sockets the attempt opened. The blocked gloo call then fails within a second
  ("accept: Invalid argument") instead of waiting out its timeout;
* the members vote through the global store; a failed group is made again under a fresh gloo prefix, up to
  `GLM_TUNE_GLOO_ATTEMPTS` (8) times, each retry logged with the error that caused it.

Groups are also made one at a time with every process arriving together (a store barrier before and after each
`new_group`): serialized, 2-process groups connected 40 times of 40. The global group that `init_parallel_env`
makes goes through the same bounded attempts. CPU runs of 2+ processes only; `install()` before anything starts
the distributed environment (PaddleNLP's TrainingArguments does, so before parsing arguments).
"""
import logging
import os
import socket
import stat
import threading
import time

import paddle

logger = logging.getLogger(__name__)

RENDEZVOUS_SECONDS = float(os.environ.get("GLM_TUNE_GLOO_RENDEZVOUS_SECONDS", "15"))
ATTEMPTS = int(os.environ.get("GLM_TUNE_GLOO_ATTEMPTS", "8"))
RETRY_LOG = "gloo rendezvous failed"  # tests and users grep worker logs for it
_installed = False


def _master() -> tuple:
    """The TCPStore's address as Paddle finds it (PADDLE_MASTER, else the first trainer endpoint)."""
    endpoint = os.environ.get("PADDLE_MASTER") or os.environ["PADDLE_TRAINER_ENDPOINTS"].split(",")[0]
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


def _store_client(world: int, timeout_seconds: int):
    from paddle.base import core

    host, port = _master()
    return core.TCPStore(host, port, False, world, timeout_seconds)


def _open_sockets() -> set:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                found.add(int(name))
        except OSError:  # closed since listed
            pass
    return found


def _shut_down(fds) -> None:
    """Shut down (not close: gloo still owns the descriptors) every socket in `fds`."""
    for fd in fds:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed or never connected
            pass


class _Watchdog:
    """A thread that cuts the sockets of the attempt in progress when it fails somewhere or stalls."""

    def __init__(self, world: int):
        self._store = _store_client(world, 60)  # its own client: a TCPStore client is not safe across threads
        self._lock = threading.Lock()
        self._attempt = None  # (failure key, deadline, sockets open before the attempt)
        threading.Thread(target=self._watch, name="gloo-rendezvous-watchdog", daemon=True).start()

    def arm(self, failed_key: str, sockets_before: set) -> None:
        with self._lock:
            self._attempt = (failed_key, time.monotonic() + RENDEZVOUS_SECONDS, sockets_before)

    def disarm(self) -> None:
        with self._lock:
            self._attempt = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                if self._attempt is None:
                    continue
                failed_key, deadline, before = self._attempt
                stalled = time.monotonic() > deadline
                if stalled:  # vote first, so every member gives this attempt up
                    self._store.add(failed_key, 1)
                elif self._store.add(failed_key, 0) == 0:
                    continue
                logger.warning("gloo rendezvous %s: cutting its sockets", "stalled for %.0f s" % RENDEZVOUS_SECONDS
                               if stalled else "failed on another process")
                _shut_down(_open_sockets() - before)
                self._attempt = None


def _store_gate(store, key: str, members: int) -> None:
    """Wait until `members` processes have passed `key` (a barrier over the global store)."""
    if store.add(key, 1) >= members:
        store.set(key + "/all", "1")
    store.wait(key + "/all")


def install() -> bool:
    """Bound and retry gloo rendezvous, and serialize group creation; CPU runs of 2+ processes, once."""
    global _installed
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    if _installed or paddle.get_device().split(":")[0] != "cpu" or world <= 1:
        return _installed
    from paddle.distributed import collective, parallel

    original_impl, original_new_group = collective._new_process_group_impl, collective.new_group
    watchdog = []  # made at the first rendezvous, when the launcher's store exists
    groups_made = [0]

    def bounded_impl(backend, store, rank, world_size, group_name, pg_options, group_id=0, **kwargs):
        """Paddle's process-group constructor, each attempt bounded by the watchdog and voted on by the members."""
        if backend != "gloo":
            return original_impl(backend, store, rank, world_size, group_name, pg_options, group_id, **kwargs)
        if not watchdog:
            watchdog.append(_Watchdog(world))
        for attempt in range(ATTEMPTS):
            key = f"glm_tune/rendezvous/{group_id}/{attempt}"
            before = _open_sockets()
            attempt_store = _store_client(world, int(RENDEZVOUS_SECONDS) * 4)
            watchdog[0].arm(key + "/failed", before)
            # A fresh gloo key prefix per attempt: a failed attempt's addresses stay behind in the store.
            prefix = group_id if attempt == 0 else 1_000_000 + 1_000 * group_id + attempt
            try:
                pg, error = original_impl(backend, attempt_store, rank, world_size, group_name, pg_options, prefix,
                                          **kwargs), None
            except Exception as err:  # gloo raises RuntimeError, a cut TCPStore wait ValueError
                pg, error = None, err
            finally:
                watchdog[0].disarm()
            if error is not None:
                store.add(key + "/failed", 1)
            _store_gate(store, key + "/voted", world_size)
            if store.add(key + "/failed", 0) == 0:
                return pg
            logger.warning("%s for a group of %d processes (attempt %d of %d)%s; making it again", RETRY_LOG,
                           world_size, attempt + 1, ATTEMPTS,
                           f": {str(error).splitlines()[0]}" if error else " on another process")
        raise RuntimeError(f"gloo could not connect a process group of {world_size} processes in {ATTEMPTS} "
                           f"attempts of at most {RENDEZVOUS_SECONDS:.0f} s each "
                           f"(GLM_TUNE_GLOO_ATTEMPTS, GLM_TUNE_GLOO_RENDEZVOUS_SECONDS)")

    def serialized_new_group(*args, **kwargs):
        """Every process makes every group (Paddle numbers group ids that way), so a barrier around each is safe."""
        if collective._default_store is None:  # the global group does not exist yet: nothing runs concurrently
            return original_new_group(*args, **kwargs)
        groups_made[0] += 1
        key = f"glm_tune/new_group/{groups_made[0]}"
        _store_gate(collective._default_store, key + "/before", world)
        group = original_new_group(*args, **kwargs)
        _store_gate(collective._default_store, key + "/after", world)
        return group

    collective._new_process_group_impl = bounded_impl
    parallel._new_process_group_impl = bounded_impl  # init_parallel_env's global group
    collective.new_group = serialized_new_group
    paddle.distributed.new_group = serialized_new_group
    _installed = True
    return True
