"""Whether the user asked to see errors' details (``SHADOWNET_DEBUG``): the CLI's tracebacks, TensorFlow's
diagnostics while converting. Every package may read it (``converters`` too, as it raises
``shadownet.exceptions``)."""

import os


def debugging() -> bool:
    """``SHADOWNET_DEBUG`` set to anything but empty or ``0``."""
    return os.environ.get("SHADOWNET_DEBUG", "").strip() not in ("", "0")
