"""The shared memory between a protected model's runtime and the ShadowNet trusted app.

Two registrations with the device's TEE client context: the buffers every tensor crosses the boundary in
(the manifest's layout, or placed to match the accelerator's own tensor pages where it shares them,
``LiteRTAccelerator.page_offsets``), and a copy of ``untrusted.tflite`` from which the TA reads the
obfuscated weights its pool refills need instead of keeping them in secure memory. Both are bound to a
session of the TA; a session opened again on the same context binds the same memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import tee_sim
from shadownet.artifacts import Artifacts, place_buffers
from shadownet.exceptions import ShadowNetError
from tee_sim import TEEError
from tee_sim import ta_shadownet_commands as commands
from tee_sim.shared_pages import PAGE


class SharedBuffers:
    """One protected model's shared memory, registered with ``context``: the accelerator holds a view of
    every buffer (``register``); the runtime, ``input_views`` / ``output_views`` in the model's order."""

    def __init__(self, artifacts: Artifacts) -> None:
        self.artifacts = artifacts
        self.context: Any = None
        self.input_views: list[np.ndarray] = []
        self.output_views: list[np.ndarray] = []
        self._shm: Any = None
        self._placement: dict[str, int] | None = None  # buffer offsets when not the manifest's
        self._weights: Any = None  # holding untrusted.tflite, for the TA's refills
        self._weights_context: Any = None

    def ensure_registered(self, context: Any, accelerator: Any) -> None:
        """Register the buffers with ``context`` unless they already are (first load; or the process's
        context was closed and replaced, and memory registered with the old one is gone; after a
        secure-world restart tee_sim registers it again itself)."""
        if self._shm is None or self._shm.released or self.context is not context:
            self.register(context, accelerator)

    def register(self, context: Any, accelerator: Any) -> None:
        """Register the buffers with ``context`` and bind ``accelerator`` to them (again: when the
        accelerator's rounds moved, its tensors' pages did), releasing the earlier registration."""
        page_offsets = getattr(accelerator, "page_offsets", None)
        offsets = page_offsets() if page_offsets is not None else {}
        buffers = self.artifacts.buffers
        if offsets:
            size, placement = place_buffers(buffers, self.artifacts.rounds, offsets, PAGE)
        else:
            size, placement = self.artifacts.shared_memory_size, None
        shm = context.register_shared_memory(size)
        try:  # until it is ours to release (a Ctrl-C in between left it registered for the process's life)
            at = placement or {b.name: b.offset for b in buffers.values()}
            views = {b.name: shm.ndarray(b.dtype, b.shape, at[b.name]) for b in buffers.values()}
            accelerator.bind(views)
        except BaseException:
            quietly_release(shm)
            raise
        old = self._shm
        self._shm, self._placement, self.context = shm, placement, context
        self.input_views = [views[f"input/{i}"] for i in range(len(self.artifacts.inputs))]
        self.output_views = [views[f"output/{i}"] for i in range(len(self.artifacts.outputs))]
        quietly_release(old)

    def bind(self, session: Any) -> None:
        """Tell the TA's ``session`` where the buffers are."""
        bind = [tee_sim.MemRef(self._shm, 0, self._shm.size, "inout")]
        if self._placement is not None:
            bind.append(tee_sim.TempMemRef(commands.encode_placement(self._placement)))
        session.invoke_command(commands.Command.BIND_SHARED_MEMORY, bind)

    def bind_weights(self, context: Any, session: Any) -> None:
        """Share ``untrusted.tflite`` with the TA's ``session``, which reads back the obfuscated weights
        its pool refills need from it (checking them with a keyed hash) instead of keeping a copy."""
        size = len(self.artifacts.untrusted)
        if self._weights is None or self._weights.released or self._weights_context is not context:
            weights = context.register_shared_memory(size)
            try:  # a Ctrl-C during the copy left it registered, and no one's to release (a helper's probe)
                weights.ndarray(np.uint8, (size,))[...] = np.frombuffer(self.artifacts.untrusted, np.uint8)
            except BaseException:
                quietly_release(weights)
                raise
            quietly_release(self._weights)
            self._weights, self._weights_context = weights, context
        session.invoke_command(commands.Command.BIND_WEIGHTS,
                               [tee_sim.MemRef(self._weights, 0, size, "in")])

    def forget_views(self) -> None:
        """Drop the views (before the accelerator that also holds them closes: the memory then unmaps)."""
        self.input_views, self.output_views = [], []

    def release(self) -> None:
        """Unregister both, quietly (closing, or a load that failed)."""
        self.forget_views()
        quietly_release(self._shm)
        quietly_release(self._weights)
        self._shm = self._weights = None


def quietly(func: Callable[[], Any]) -> None:
    """``func()``, its TEE, ShadowNet, OS or buffer error ignored (cleaning up after another)."""
    try:
        func()
    except (TEEError, ShadowNetError, OSError, BufferError):
        pass


def quietly_release(shm: Any) -> None:
    if shm is not None:
        quietly(shm.release)
