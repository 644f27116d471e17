"""Offline conversion (model vendor side): TFLite graph layer, partition, obfuscation schemes, artifacts.

``converters.convert(model, out_dir, ...)`` is the entry point (imported lazily, so that importing one
module of the package does not pull in the whole pipeline).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "convert":
        from converters.pipeline import convert

        return convert
    raise AttributeError(f"module 'converters' has no attribute {name!r}")
