"""The transport of a ``Context`` whose secure OS is an object in this process (``transport="inprocess"``):
``ProcessTransport``'s interface (``tee_sim.transport``), without its isolation; for fast unit tests and for
looking at the trusted apps' objects."""

from __future__ import annotations

import mmap
import uuid
from typing import Any

from tee_sim.secure_os import Outcome, SecureOS, WireParam
from tee_sim.transport import Answer, Prepared, ProcessTransport


class InProcessTransport:
    """The secure OS as an object in this process: same interface, no isolation; for fast unit tests."""

    alive = True

    def __init__(self, home: str | None, memory_cap: int, **_: Any) -> None:
        self.generation = 1
        self._os = SecureOS(home, memory_cap)
        self.orphaned_sessions: list[int] = []  # stays empty: requests are answered before their calls return

    def _with_memory(self, outcome: Outcome) -> Outcome:
        memory = self._os.memory
        outcome.memory = (memory.used, memory.peak, memory.cap)
        return outcome

    def open_session(self, ta_uuid: uuid.UUID, wire: tuple[WireParam, ...]) -> Outcome:
        return self._with_memory(self._os.open_session(ta_uuid, wire))

    def invoke(self, session: int, cmd_id: int, wire: tuple[WireParam, ...], timeout: float) -> Outcome:
        return self._with_memory(self._os.invoke(session, cmd_id, wire))

    def prepare_invoke(self, session: int, cmd_id: int, wire: tuple[WireParam, ...]) -> Prepared:
        """As ``ProcessTransport.prepare_invoke``."""
        def invoke(timeout: float) -> Answer:
            outcome = self.invoke(session, cmd_id, wire, timeout)
            return outcome.code, outcome.ta_time_ns, outcome.memory, outcome if outcome.code else None
        return invoke

    def close_session(self, session: int) -> Outcome:
        return self._with_memory(self._os.close_session(session))

    def stats(self) -> Outcome:
        return self._with_memory(Outcome())

    @staticmethod
    def new_buffer(size: int) -> tuple[mmap.mmap, int | None]:
        return ProcessTransport.new_buffer(size)  # a memfd too, so that client pages can be shared

    def register_shm(self, shm_id: int, buffer: mmap.mmap, fd: int | None) -> None:
        self._os.register_shm(shm_id, buffer)

    def release_shm(self, shm_id: int) -> None:
        self._os.release_shm(shm_id)

    def close(self) -> None:
        self._os.shutdown()

    def ensure_running(self) -> None:
        pass

    def settle(self, timeout: float | None = None) -> None:
        pass  # every request is answered before its call returns

    def pin(self, pinned: bool) -> None:
        pass  # the secure world runs in its caller's thread
