"""The background refill of a ``ProtectedModel``'s pool of one-time masks and check projections (see
``shadownet.load``'s ``background_refill``): a thread that works while the model is idle."""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

from shadownet.exceptions import ShadowNetError

if TYPE_CHECKING:
    from shadownet.runtime import ProtectedModel


class BackgroundRefill(threading.Thread):
    """Refills a model's pool between inferences: a daemon thread at the lowest scheduling priority that
    wakes after each inference and asks the TEE for ``CHUNK_US`` of work at a time, stepping aside as soon
    as a caller waits for the model (so an inference waits at most one chunk) or the pool is full. It holds
    the model weakly, and only while it works: a model dropped without ``close()`` is collected, and its
    ``__del__`` closes it (its TEE session and secure memory with it), as LiteRT's interpreters are."""

    CHUNK_US = 4000

    def __init__(self, model: ProtectedModel) -> None:
        super().__init__(name=f"shadownet-refill-{model.artifacts.directory.name}", daemon=True)
        self._model = weakref.ref(model)
        self._wake = threading.Event()
        self._stopped = False
        self._wake.set()  # fill the pool right after load

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self is not threading.current_thread():
            self.join(timeout=5)

    def run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            model = self._model()
            if model is None:
                return
            while not self._stopped and model._waiting == 0:
                with model._lock:
                    if model._closed or model._session is None:
                        break
                    try:
                        ready, capacity = model._refill(self.CHUNK_US)
                    except ShadowNetError:
                        break  # the next inference reports what is wrong (or makes its masks itself)
                if ready >= capacity:
                    break
            del model  # not held while waiting: the model may be collected meanwhile
