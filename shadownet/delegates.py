"""LiteRT delegates for the accelerator (``shadownet.load``'s and the bench's ``delegate``): a delegate
library's path, checked before LiteRT loads it, or a LiteRT ``Delegate``."""

from __future__ import annotations

import ctypes
import os
from typing import Any

from ai_edge_litert.interpreter import load_delegate

from shadownet.exceptions import ArtifactError


def load_delegates(delegate: Any) -> list[Any]:
    """``load``'s ``delegate`` as the list ``LiteRTAccelerator`` takes: ``None``, a delegate library path or a
    LiteRT ``Delegate``, or a list of them; a path that does not load is an ``ArtifactError``."""
    if delegate is None:
        return []
    items = delegate if isinstance(delegate, list | tuple) else [delegate]
    loaded = []
    for d in items:
        if isinstance(d, str | os.PathLike):
            d = os.fspath(d)
            check_delegate_library(d)
            try:
                loaded.append(load_delegate(d))
            except (ValueError, OSError) as exc:
                raise ArtifactError(f"cannot load the accelerator delegate {d}: {exc}") from None
        elif hasattr(d, "_get_native_delegate_pointer"):  # a LiteRT Delegate (load_delegate's)
            loaded.append(d)
        else:  # LiteRT raised an AttributeError from deep inside for these (a helper's probe)
            raise TypeError(f"a delegate is a delegate library's path or a LiteRT Delegate, not {d!r}")
    return loaded


def check_delegate_library(path: str) -> None:
    """Open ``path`` as LiteRT's ``load_delegate`` would, first: a library that does not load or lacks the
    external-delegate entry points is an ``ArtifactError`` here. (LiteRT's ``Delegate`` half-built by such a
    library prints an ignored ``AttributeError`` when it is collected, or raises one.)"""
    try:
        library = ctypes.CDLL(path)
    except OSError as exc:
        raise ArtifactError(f"cannot load the accelerator delegate {path}: {exc}") from None
    missing = [name for name in ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")
               if not hasattr(library, name)]
    if missing:
        raise ArtifactError(f"{path} is not a LiteRT delegate library (no {', '.join(missing)})")
