"""Writing outputs safely: whether a command may write where it was told to (checked before any work starts,
so a typo in a path never costs a downloaded checkpoint, a data set or a training run), and writers that leave
either the old file or folder or the new one, never half of one.

Rules (docs/safety.md):
  - an output that is an input, contains one or lies inside one is refused;
  - the current folder (and any folder holding it) is never a target;
  - an output folder that exists and is not empty is replaced only when this command wrote it before (the
    ownership marker below says so) or when the user passed the command's overwrite flag;
  - an output file that exists is replaced only when it is recognisably this command's earlier output or with
    the overwrite flag; an output file that is a folder (or a folder that is a file) is refused.
Framework-free (no paddle / torch import), so qlora/ and ascend/ use the same rules.
"""
import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Optional

from glm_tune.errors import GlmTuneError

OWNER_MARKER = ".glm-tune-output.json"


class OutputRefused(GlmTuneError):
    """The command was asked to write somewhere it must not; nothing was written."""


def _resolve(path) -> Path:
    return Path(path).expanduser().resolve()


def read_owner(folder) -> Optional[dict]:
    """The ownership marker of `folder` ({"command": ..., ...}), or None when it has none or it is unreadable."""
    try:
        owner = json.loads((Path(folder) / OWNER_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def write_owner(folder, command: str, **details) -> None:
    """Mark `folder` as written by `command` (so a re-run of the same command may replace it)."""
    atomic_write_json(Path(folder) / OWNER_MARKER, {"command": command, **details})


def check_not_input(output, flag: str, inputs: Dict[str, object]) -> None:
    """Refuse an output that is one of `inputs` ({flag: path}), contains one or lies inside one."""
    out = _resolve(output)
    for input_flag, path in inputs.items():
        if not path:
            continue
        source = _resolve(path)
        if out == source:
            raise OutputRefused(f"{flag} {output} is also {input_flag}: writing there would replace the input; "
                                f"choose another {flag}")
        if out in source.parents:
            raise OutputRefused(f"{flag} {output} contains {input_flag} {path}: writing there would replace the "
                                f"input; choose a {flag} outside it")
        if source in out.parents and source.is_dir():
            raise OutputRefused(f"{flag} {output} lies inside {input_flag} {path}: the output would change the "
                                f"input folder; choose a {flag} outside it")


def check_not_working_folder(output, flag: str) -> None:
    out, cwd = _resolve(output), Path.cwd().resolve()
    if out == cwd or out in cwd.parents or out == Path(out.anchor) or out == Path.home().resolve():
        raise OutputRefused(f"{flag} {output} is the current folder, one that holds it, the home folder or the "
                            f"filesystem root; a command never replaces those: pass a new folder such as {flag} "
                            f"{Path(output) / 'out'}")


def folder_listing(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def folder_is_empty(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def check_writable(folder: Path, flag: str, path) -> None:
    """This process can make a file in `folder`, tried for real (permission bits do not tell: root ignores
    them and a read-only mount ignores root), so an unwritable output is refused before the work, not after."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".glm-tune-write-check-")
    except OSError as err:
        raise OutputRefused(f"{flag} {path}: this process cannot write in {folder} ({err.strerror}); nothing was "
                            f"done. Choose a {flag} in a folder you can write to") from None
    os.close(handle)
    os.unlink(probe)


def _check_parent_can_hold(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` is a folder this process can write in (so `path` can be made,
    and the atomic writers' staging file or folder beside it too)."""
    for parent in path.resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputRefused(f"{flag} {path}: {parent} is a file, so {path.name} cannot be made under it")
            check_writable(parent, flag, path)
            return


def check_target_folder(output_dir, flag: str, inputs: Dict[str, object] = None) -> Path:
    """The checks every output folder passes whoever owns it: a folder (or nothing yet) that can be made,
    no input inside or around it, not the working folder or one of its ancestors."""
    if output_dir is None or str(output_dir).strip() == "":
        raise OutputRefused(f"{flag} is required")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputRefused(f"{flag} {output_dir} is a file, not a folder; pass a folder path")
    _check_parent_can_hold(path, flag)
    if path.is_dir():  # training writes checkpoints inside it
        check_writable(path, flag, output_dir)
    check_not_input(path, flag, inputs or {})
    check_not_working_folder(path, flag)
    return path


def check_output_dir(output_dir, command: str, flag: str = "--output_dir", inputs: Dict[str, object] = None,
                     overwrite: bool = False) -> Path:
    """Refuse `output_dir` unless it is absent, empty, an earlier output of `command`, or `overwrite` is set.
    Returns it as a Path. Call it before any work starts."""
    path = check_target_folder(output_dir, flag, inputs)
    if path.is_dir() and not folder_is_empty(path) and not overwrite:
        owner = read_owner(path)
        if owner is None or owner.get("command") != command:
            made_by = f"written by {owner['command']}" if owner else "not written by this command"
            raise OutputRefused(
                f"{flag} {output_dir} already exists and is {made_by} (it holds {folder_listing(path)}); nothing was "
                "changed. Choose a new folder, or pass --overwrite to replace that folder")
    return path


def check_output_file(output_file, flag: str = "--output_file", inputs: Dict[str, object] = None,
                      overwrite: bool = False, is_own_output: Callable[[Path], bool] = None) -> Path:
    """Refuse `output_file` when it is a folder, an input, inside an input folder, or an existing file that is
    not this command's earlier output (`is_own_output`) unless `overwrite` is set."""
    path = Path(output_file)
    if str(output_file).endswith(("/", "\\")) or path.is_dir():
        raise OutputRefused(f"{flag} {output_file} is a folder; pass a file path such as "
                            f"{Path(output_file) / 'predictions.json'}")
    _check_parent_can_hold(path, flag)
    check_not_input(path, flag, inputs or {})
    if path.is_file() and path.stat().st_size and not overwrite:
        if is_own_output is None or not is_own_output(path):
            raise OutputRefused(f"{flag} {output_file} already exists and is not an earlier output of this "
                                "command; nothing was changed. Choose another file, or pass --overwrite "
                                "to replace it")
    return path


# ------------------------------------------------------------------------------------------ atomic writers


def atomic_write_text(path, text: str) -> None:
    """Write `text` to `path` so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _remove(path: Path) -> None:
    """A folder, or a symlink the output was (rmtree refuses links, and ignore_errors would hide that)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_leftovers(output_dir: Path) -> None:
    """Staging and replaced folders that `atomic_folder` left beside `output_dir` when its process was killed
    (SIGTERM, SIGKILL, a power cut): gigabytes for a 6B export. Only this suite's names for `output_dir`
    (`.NAME.staging.PID.*`, `.NAME.replaced.PID`) are touched, and only when process PID is gone, so a
    concurrent run on the same output keeps its own."""
    for leftover in output_dir.parent.glob(f".{glob.escape(output_dir.name)}.*"):
        parts = leftover.name[len(output_dir.name) + 2:].split(".")
        if len(parts) >= 2 and parts[0] in ("staging", "replaced") and parts[1].isdigit() \
                and not _pid_alive(int(parts[1])):
            _remove(leftover)


@contextmanager
def atomic_folder(output_dir, command: str, overwrite: bool = False, inputs: dict = None,
                  flag: str = "--output_dir", replace: bool = True, details: dict = None):
    """Yield a private staging folder beside `output_dir`; when the block succeeds it becomes `output_dir`,
    marked as written by `command` (with `details`). `check_output_dir` decides first (and again just before
    the swap) whether `output_dir` may be replaced: absent, empty, written by `command` before, or `overwrite`.
    With replace=False an `output_dir` that exists by then (another process made it first) is kept and the
    staging folder dropped. When the block raises, the staging folder is removed and `output_dir` is left as
    it was: never a half-written folder, never a folder the command was not told to replace."""
    def allowed():
        check_output_dir(output_dir, command, flag, inputs, overwrite)

    allowed()
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging.{os.getpid()}.", dir=output_dir.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model folder is meant to be shared
    old = None
    try:
        yield staging
        write_owner(staging, command, **(details or {}))
        if output_dir.exists():
            if not replace:
                return
            allowed()
            old = output_dir.with_name(f".{output_dir.name}.replaced.{os.getpid()}")
            os.replace(output_dir, old)
        try:
            os.replace(staging, output_dir)
        except BaseException:
            if old is not None:  # the swap failed half-way: the earlier output goes back where it was
                os.replace(old, output_dir)
                old = None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            _remove(old)
