"""The ShadowNet trusted app's C kernels (``ta_shadownet_kernels.c``, built by ``setup.py``), loaded.

Plain C without the Python API, called through ``ctypes`` with one structure per call, prepared once:
``sn_run`` (restore / push, ``tee_sim.ta_shadownet_restore_push``), ``fv_prepare`` and ``fv_check``
(Freivalds' check, ``tee_sim.freivalds``). The C file says why C and how each kernel works.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

SOURCE = Path(__file__).with_name("ta_shadownet_kernels.c")  # measured with the TA's code
LANES = 16  # the kernels' vector width in floats


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec("tee_sim._ta_shadownet_kernels")  # the built file, not imported
    if spec is None or spec.origin is None:
        raise ImportError(f"the trusted app's C kernels are not built in {Path(__file__).parent}: reinstall "
                          "shadownet (pip install .) on a machine with a C compiler")
    library = ctypes.CDLL(spec.origin)
    for name in ("sn_run", "fv_prepare", "fv_check"):
        function = getattr(library, name)
        function.argtypes = [ctypes.c_void_p]
        function.restype = ctypes.c_int
    return library


LIBRARY = _load()
