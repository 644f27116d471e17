"""The client's parameters in wire form and back (libteec's marshalling): Values and registered memory
references go as they are; temporary memory references are copied through one shared bounce buffer per
context, grown on demand and dropped once a large transfer is done."""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tee_sim.errors import TEE_ERROR_SHORT_BUFFER, TEE_SUCCESS
from tee_sim.params import MAX_PARAMS, ClientParam, MemRef, TempMemRef, Value
from tee_sim.secure_os import NO_PARAMS, Outcome, WireParam
from tee_sim.shared_memory import SharedMemory, api_error

if TYPE_CHECKING:
    from tee_sim.client import Context

BOUNCE_MIN = 64 << 10
BOUNCE_KEEP = 4 << 20  # a bounce buffer grown past this for a big setup transfer is dropped after it
NO_TEMPS: list[int] = []
ALIGN = 64


class Marshalling:
    """A context's marshalling of parameters, and its bounce buffer (the context's lock held throughout)."""

    def __init__(self, context: Context) -> None:
        # Weakly: a context dropped without close() is collected at once, and its finalizer stops the secure
        # world (a strong reference made a cycle that waited for the garbage collector: a review's).
        self._context = weakref.ref(context)
        self.bounce: SharedMemory | None = None

    def marshal(self, params: Sequence[ClientParam]) -> tuple[tuple[WireParam, ...], list[int], int]:
        """Check the client's parameters and put them in wire form; temporary memrefs go to the bounce buffer.

        Returns the wire parameters, the bounce offsets of the temporary memrefs and the bytes going in.
        """
        if isinstance(params, Value | TempMemRef | MemRef) or len(params) > MAX_PARAMS:
            raise api_error(f"params must be a sequence of at most {MAX_PARAMS} parameters")
        temps, total = [], 0
        for p in params:
            kind = type(p)
            if kind is TempMemRef:
                temps.append(total)
                total += -(-max(p.size, 1) // ALIGN) * ALIGN
            elif kind is not Value and kind is not MemRef:
                raise api_error(f"a parameter must be a Value, TempMemRef or MemRef, not {kind.__name__}")
        if temps:
            self._ensure_bounce(total)
        context = self._context()
        wire: list[WireParam] = []
        temp_index = bytes_in = 0
        for p in params:
            kind = type(p)
            if kind is Value:
                wire.append((p.wire_type, p.a, p.b, 0, 0, 0))
                bytes_in += 16 if p.direction != "out" else 0
            elif kind is TempMemRef:
                bounce = self.bounce
                assert bounce is not None
                offset = temps[temp_index]
                temp_index += 1
                if p.data is not None and p.direction != "out":
                    bounce._mmap[offset : offset + len(p.data)] = p.data
                    bytes_in += p.size
                wire.append((p.wire_type, 0, 0, bounce._id, offset, p.size))
            else:
                shm = p.shm
                if shm._context is not context or shm.released:
                    raise api_error("MemRef of shared memory not registered with this context")
                if shm._pid != os.getpid():  # a forked child's: the memory is the parent's, which its
                    # secure world reads and writes; registered again with the child's, the child's TA wrote
                    # into the parent's live buffer (a helper's probe)
                    raise api_error("MemRef of shared memory the parent process registered (this process "
                                    "was forked since): register memory of this process's own")
                if shm._generation != context._transport.generation:
                    context._register(shm)  # the secure world restarted since
                wire.append((p.wire_type, 0, 0, shm._id, p.offset, p.size))
                bytes_in += p.size if p.direction != "out" else 0
        return tuple(wire) + NO_PARAMS[len(wire) :], temps, bytes_in

    def unmarshal(
        self, params: Sequence[ClientParam], wire: tuple[WireParam, ...], temps: list[int], outcome: Outcome
    ) -> int:
        """Copy outputs back into the caller's parameters; return the bytes that came out."""
        if outcome.code not in (TEE_SUCCESS, TEE_ERROR_SHORT_BUFFER):
            return 0
        bytes_out = 0
        for p, w, (a, b, size) in zip(params, wire, outcome.outputs, strict=False):
            if isinstance(p, Value):
                if p.direction != "in":
                    p.a, p.b = a, b
                    bytes_out += 16
            elif p.direction != "in":
                capacity = w[5]
                p.size = size
                if isinstance(p, TempMemRef) and size <= capacity and outcome.code == TEE_SUCCESS:
                    assert self.bounce is not None
                    p.data = bytes(self.bounce._mmap[w[4] : w[4] + size])
                if outcome.code == TEE_SUCCESS:
                    bytes_out += size
        return bytes_out

    def forget_after_fork(self) -> None:
        """In a forked child: the bounce buffer is the parent's memory (a memfd mapped shared, from which the
        parent's secure world reads the parent's parameters and into which it writes their outputs). Forgotten
        here, the child's mapping closed and nothing sent to any secure world: the child's next temporary
        memref gets a buffer of its own. Kept, a child that went on with the context wrote its parameters
        over the parent's in flight (a helper's probe: 26227 of 26377 of the parent's echoes came back with
        the child's bytes)."""
        bounce, self.bounce = self.bounce, None
        if bounce is not None:
            bounce.forget_after_fork()

    def trim_bounce(self) -> None:
        bounce = self.bounce
        if bounce is not None and bounce.size > BOUNCE_KEEP:
            self.bounce = None  # first: a release that fails or is interrupted leaves none behind
            bounce.release()

    def _ensure_bounce(self, total: int) -> None:
        context, bounce = self._context(), self.bounce
        if bounce is not None and bounce.size >= total:
            if bounce._generation != context._transport.generation:
                context._register(bounce)
            return
        # The old one forgotten before it is released and the new one made: either may fail (out of memory
        # or descriptors, an interrupt), and a released buffer kept here failed every later call that fit
        # in it (a review's: "mmap closed or invalid").
        self.bounce = None
        if bounce is not None:
            bounce.release()
        size = max(BOUNCE_MIN, 1 << (total - 1).bit_length())
        self.bounce = SharedMemory(context, context._next_shm, size)
        context._next_shm += 1
        context._register(self.bounce)  # refused or interrupted: registered again at its next use
