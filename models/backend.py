"""The one place the zoo imports TensorFlow and Keras: quietly, and with a clear error without the extra."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

from shadownet.exceptions import TensorFlowMissingError


def require_tensorflow() -> tuple[ModuleType, ModuleType]:
    """Return ``(tensorflow, keras)``, imported with TensorFlow's C++ logging off."""
    # TensorFlow reads this once, when its native library loads. It is not enough when LiteRT's library
    # loaded first (TensorFlow 2.21 then logs its oneDNN notice through absl before it reads the
    # variable), so the import runs inside quiet() too.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with quiet():
            import keras
            import tensorflow as tf
    except ImportError as exc:
        raise TensorFlowMissingError(
            f"the model zoo needs TensorFlow ({exc}); install the tf extra: pip install 'shadownet[tf]'"
        ) from exc
    return tf, keras


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow everything printed to stdout/stderr, Python- or C++-level, inside the block.

    TensorFlow's converter prints Python messages ("Saved artifact at ...") and absl C++ log lines
    that no environment variable reaches; what was printed is kept and appended to an error's
    message if the block fails, so nothing useful is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(sys.stderr):
                yield
        except Exception as exc:
            sys.stdout.flush()
            sys.stderr.flush()
            sink.seek(0)
            printed = sink.read().decode(errors="replace").strip()
            if printed:
                exc.add_note(printed[-4000:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
