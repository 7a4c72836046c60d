"""The one base class of every error a user can fix, and the wrapper that turns it into a one-line message.

Each command's `__main__` runs `run_cli(main)`: a `GlmTuneError` (bad flag, bad file, refused output) ends the
process with `error: <message>` on one line and exit code 1; anything else is a bug and keeps its traceback.
Framework-free, so qlora/ and ascend/ commands share it.
"""
import sys


class GlmTuneError(ValueError):
    """Input the user can fix; the message names the flag or file and what to do."""


def one_line(message) -> str:
    return " ".join(str(message).split())


def run_cli(main, argv=None):
    """Run a command's main(); a GlmTuneError becomes `error: ...` on stderr and exit status 1."""
    try:
        return main(argv)
    except GlmTuneError as err:
        sys.exit(f"error: {one_line(err)}")
