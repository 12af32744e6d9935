"""Importing qwen_tts without the notices it prints about optional packages this project never uses.

qwen_tts 0.1.1 prints, at import, a flash-attn banner (for its 25 Hz tokenizer's whisper encoder),
and the `sox` package it imports logs "SoX could not be found!" while its shell says
"sox: not found". None of that concerns the 12 Hz models. The package's modules that import qwen_tts
(sequence_layout.py, speakers.py) call `import_qwen_tts()` first, so each of the three commands
imports it quietly whatever it imports first; every other line of output is kept.
"""

import contextlib
import io
import logging
import os
import sys
import tempfile

# Exactly what qwen_tts/core/tokenizer_25hz/vq/whisper_encoder.py prints when flash-attn is absent.
FLASH_ATTN_BANNER = ("\n********\nWarning: flash-attn is not installed. Will only run the manual PyTorch version. "
                     "Please install flash-attn for faster inference.\n********\n \n")
SOX_NOTICE = "SoX could not be found!"  # sox/__init__.py logs it (logger "sox") when `sox -h` fails
SHELL_SOX_NOT_FOUND = "sox: not found"  # what /bin/sh writes to the process's stderr for that check


def import_qwen_tts():
    """`import qwen_tts`, minus its notices about flash-attn and SoX; returns the module."""
    if "qwen_tts" in sys.modules:
        return sys.modules["qwen_tts"]
    printed = io.StringIO()
    sox_logger = logging.getLogger("sox")
    sox_logger.addFilter(without_sox_notice)
    try:
        with contextlib.redirect_stdout(printed), shell_stderr_without(SHELL_SOX_NOT_FOUND):
            import qwen_tts
    finally:
        sox_logger.removeFilter(without_sox_notice)
        sys.stdout.write(printed.getvalue().replace(FLASH_ATTN_BANNER, ""))
    return qwen_tts


def without_sox_notice(record: logging.LogRecord) -> bool:
    return SOX_NOTICE not in record.getMessage()


@contextlib.contextmanager
def shell_stderr_without(notice: str):
    """Send file descriptor 2 (where child shells and C libraries write) to a temporary file, then
    copy back every line of it that does not contain `notice`. Yields a list that receives, on the
    way out, the lines left out."""
    sys.stderr.flush()
    saved = os.dup(2)
    left_out = []
    with tempfile.TemporaryFile() as written:
        os.dup2(written.fileno(), 2)
        try:
            yield left_out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            written.seek(0)
            for line in written.read().decode(errors="replace").splitlines(keepends=True):
                (left_out.append if notice in line else sys.stderr.write)(line)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings about its own deprecations and generation defaults (the pad id generate
    picks, a sampling flag it ignores), hidden: they repeat for every batch and say nothing about the
    data or the model."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
