"""What reaches the console: the libraries' start-up noise stays off, this suite's steps and figures stay on.

Paddle, setuptools and `datasets` print warnings and log lines at import that a user can do nothing about
(`No ccache found`, `Setuptools is replacing distutils`, `PyTorch version … available`), and Paddle Inference
writes a glog line per graph pass each time an engine is built. Each entry script calls `quiet_startup()` as its
first statement, before the imports that load paddle (importing this module does nothing by itself, so an import
sorter cannot break it); `--verbose True` or GLM_TUNE_VERBOSE=1 brings all of it back. Warnings that matter to the user
(anything else) are still shown. Framework-free: nothing here imports paddle.
"""
import logging
import os
import sys
import warnings

VERBOSE_ENV = "GLM_TUNE_VERBOSE"

# Warnings the libraries raise at import (and paddle.jit while tracing) that carry no action for a user.
LIBRARY_NOISE = ("No ccache found", "Setuptools is replacing distutils", "pkg_resources is deprecated",
                 "Tensor do not have 'place' interface for pir graph mode")  # the last: paddle.jit tracing

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose_requested(argv=None) -> bool:
    """--verbose [True] on the command line, or GLM_TUNE_VERBOSE set to anything but 0/false."""
    if os.environ.get(VERBOSE_ENV, "0").lower() not in ("", "0", "false", "no"):
        return True
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for i, arg in enumerate(argv):
        if arg == "--verbose":
            following = argv[i + 1].lower() if i + 1 < len(argv) else "true"
            return following not in ("false", "0", "no")
        if arg.startswith("--verbose="):
            return arg.split("=", 1)[1].lower() not in ("false", "0", "no")
    return False


def add_verbose_flag(parser) -> None:
    """--verbose for an argparse tool (the dataclass scripts get it from argument.ConsoleArgument)."""
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own start-up warnings and log lines (also GLM_TUNE_VERBOSE=1)")


def quiet_startup(argv=None) -> bool:
    """Call before importing paddle: filters the import-time noise unless verbose. Returns verbose."""
    verbose = verbose_requested(argv)
    if not verbose:
        for text in LIBRARY_NOISE:
            warnings.filterwarnings("ignore", message=f".*{text}.*")
        os.environ.setdefault("GLOG_minloglevel", "2")  # Paddle's C++ INFO and WARNING lines (graph passes)
        # `datasets` logs "PyTorch version … available" while it imports, before its own verbosity applies.
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        logging.getLogger("datasets").setLevel(logging.WARNING)
    return verbose


def setup_logging(verbose: bool = None) -> None:
    """Our INFO lines on stderr; PaddleNLP's and jieba's per-file chatter only when verbose."""
    verbose = verbose_requested() if verbose is None else verbose
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for chatty in ("jieba", "onnxruntime"):  # per-word / per-node INFO lines
        logging.getLogger(chatty).setLevel(logging.INFO if verbose else logging.WARNING)
    import importlib.util

    if importlib.util.find_spec("paddlenlp") is not None:  # absent in the qlora/ and ascend/ environments
        from paddlenlp.utils.log import logger as paddlenlp_logger

        paddlenlp_logger.set_level("INFO" if verbose else "WARNING")
        if not verbose and not any(isinstance(f, _DropLibraryNoise) for f in paddlenlp_logger.logger.filters):
            paddlenlp_logger.logger.addFilter(_DropLibraryNoise())


class _DropLibraryNoise(logging.Filter):
    """PaddleNLP warnings about its own defaults, printed whatever the user does."""

    NOISE = ("model.generation_config is in conflict with model.config",
             "evaluation_strategy reset to IntervalStrategy.STEPS")

    def filter(self, record):
        return not any(text in record.getMessage() for text in self.NOISE)

