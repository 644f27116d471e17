"""The all-in-TEE baseline trusted app's "header": UUID, command ids and the shared-memory layout.

The baseline runs a whole, unprotected ``.tflite`` inside the secure world (DarkneTZ-style): the safe way
to deploy a model when the TEE is big and fast enough, and what ``shadownet bench`` compares against.

- ``LOAD``: [TempMemRef(model .tflite, in), Value(a=kernels)]: ``KERNELS_XNNPACK`` (LiteRT's XNNPACK
  delegate, the best CPU kernels) or ``KERNELS_BUILTIN`` (LiteRT's reference builtin kernels: a TEE
  without SIMD libraries); one thread, as one secure core.
- ``BIND_SHARED_MEMORY``: [MemRef(shm, 0, size, inout)]: the inputs then the outputs, in LiteRT's
  ``get_input_details()`` / ``get_output_details()`` order, at the offsets ``io_layout`` gives.
- ``RUN``: no parameters: inputs from shared memory -> invoke -> outputs to shared memory.
- ``GET_STATS``: [Value(out)]: a = secure bytes the TA accounts for (the model and its activations,
  see ``tee_sim.ta_all_in_tee``), b = growth of the secure world's resident memory since LOAD began.
"""

import enum
import uuid
from collections.abc import Sequence

UUID = uuid.UUID("0d3c8a52-61f4-4f0e-9a57-3b1b7e5c2a90")
KERNELS_XNNPACK, KERNELS_BUILTIN = 0, 1
ALIGN = 64


class Command(enum.IntEnum):
    LOAD = 1
    BIND_SHARED_MEMORY = 2
    RUN = 3
    GET_STATS = 4


def io_layout(nbytes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of tensors of ``nbytes`` placed one after another, 64-byte aligned, and the total size."""
    offsets, at = [], 0
    for n in nbytes:
        offsets.append(at)
        at += -(-int(n) // ALIGN) * ALIGN
    return offsets, max(at, ALIGN)
