"""ShadowNet: run a CNN on an untrusted accelerator while a TEE keeps its weights secret.

The public API is ``convert``, ``load`` (returning a ``ProtectedModel``) and ``Interpreter`` (LiteRT's
``Interpreter`` surface over a protected model); errors are in ``shadownet.exceptions``. Names are
loaded on first use so that ``import shadownet`` stays cheap and never imports TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["convert", "load", "ProtectedModel", "Interpreter"]
_API_MODULES = ("exceptions", "accelerator")  # the errors, and the accelerator interface (``load``'s)
__version__ = "0.1.0"
# The most accelerator threads ``load`` and the CLI take: a probe's --num_threads 50000 could not start
# the refill thread beside LiteRT's and the process died (SIGSEGV) in the teardown of the half-built model.
MAX_THREADS = 256


def __getattr__(name: str) -> Any:
    if name in __all__:
        from shadownet import api

        return getattr(api, name)
    # The API's submodules, as attributes after ``import shadownet`` alone as once something has imported
    # them (a new user's AttributeError before); no other, which could import TensorFlow.
    if name in _API_MODULES:
        return importlib.import_module(f"shadownet.{name}")
    raise AttributeError(f"module 'shadownet' has no attribute {name!r}")
