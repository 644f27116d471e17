"""The runners of ``shadownet bench``'s modes (the method is in ``shadownet.bench``'s docstring), each a call
on a list of inputs that leaves the outputs in ``results``: ``Unprotected`` (LiteRT on the original model),
``AllInTEE`` (the whole model in the all-in-TEE trusted app) and ``Protected`` (``shadownet.load`` on the
converted artifacts, for ``shadownet`` and ``shadownet-verify``). ``shadownet.bench_measure`` times them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shadownet.bench_throughput import warm_past_trial


class Unprotected:
    """LiteRT on the original model, with the bench's threads and delegates (what a vendor ships today)."""

    def __init__(self, model: bytes, num_threads: int, delegates: list[Any]) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=model, num_threads=num_threads,
                                       experimental_delegates=delegates or None)
        self.interpreter.allocate_tensors()
        # (index, view, rank 0): LiteRT gives a rank-0 tensor as a scalar, not a view to copy into (an
        # internal error: a probe); it is set
        self.inputs = [(d["index"], self.interpreter.tensor(d["index"]), len(d["shape"]) == 0)
                       for d in self.interpreter.get_input_details()]
        self.outputs = [self.interpreter.tensor(d["index"]) for d in self.interpreter.get_output_details()]
        # Made at the first call: an output whose shape LiteRT computes at run time (a Keras model's open
        # batch before a transposed conv) has no data before an invoke (it stopped the bench: a probe).
        self.results: list[np.ndarray] = []

    def __call__(self, inputs: Sequence[np.ndarray]) -> None:
        for (index, tensor, scalar), x in zip(self.inputs, inputs, strict=True):
            if scalar:
                self.interpreter.set_tensor(index, x)
            else:
                np.copyto(tensor(), x)  # no name holds the view: LiteRT refuses to invoke while one lives
        self.interpreter.invoke()
        if not self.results:
            self.results = [np.empty(t().shape, t().dtype) for t in self.outputs]
        for out, tensor in zip(self.results, self.outputs, strict=True):
            np.copyto(out, tensor())

    def close(self) -> None:
        self.interpreter = None


class AllInTEE:
    """The whole model run by the all-in-TEE trusted app (``tee_sim.ta_all_in_tee``)."""

    def __init__(self, context: Any, model: bytes, kernels: int, specs: Sequence[tuple[tuple[int, ...], Any]],
                 n_inputs: int) -> None:
        import tee_sim
        from tee_sim.ta_all_in_tee_commands import UUID, Command, io_layout

        self._tee, self._command = tee_sim, Command
        offsets, size = io_layout([int(np.prod(s, dtype=np.int64)) * np.dtype(t).itemsize for s, t in specs])
        self.session = context.open_session(UUID)
        self.shm = None
        try:
            self.session.invoke_command(Command.LOAD, [tee_sim.TempMemRef(model), tee_sim.Value(a=kernels)])
            self.shm = context.register_shared_memory(size)
            self.session.invoke_command(Command.BIND_SHARED_MEMORY,
                                        [tee_sim.MemRef(self.shm, 0, size, "inout")])
        except BaseException:
            self.close()
            raise
        views = [self.shm.ndarray(t, s, o) for (s, t), o in zip(specs, offsets, strict=True)]
        self.inputs, self.outputs = views[:n_inputs], views[n_inputs:]
        self.results = [np.empty(v.shape, v.dtype) for v in self.outputs]
        self._run = int(Command.RUN)

    def __call__(self, inputs: Sequence[np.ndarray]) -> None:
        for view, x in zip(self.inputs, inputs, strict=True):
            np.copyto(view, x)
        self.session.invoke_command(self._run)
        for out, view in zip(self.results, self.outputs, strict=True):
            np.copyto(out, view)

    def memory(self) -> tuple[int, int]:
        out = self._tee.Value(direction="out")
        self.session.invoke_command(self._command.GET_STATS, [out])
        return out.a, out.b

    def close(self) -> None:
        try:
            self.session.close()
        finally:
            if self.shm is not None:
                self.shm.release()


class Protected:
    """A protected model (``shadownet.load``; ``verify``: every accelerator result checked by the TEE), warmed
    past its accelerator's thread trial on ``inputs``; ``refill`` makes its one-time masks between calls,
    ``record`` keeps the last call's ``stats()`` in ``stats``."""

    def __init__(self, out_dir: Path, num_threads: int, delegate: str | None, inputs: Sequence[np.ndarray],
                 verify: bool = False) -> None:
        from shadownet.runtime import load

        # The pool of one-time masks (and check projections) is refilled after each run, untimed
        # (``refill``), not by the background thread: its refills would otherwise run in the secure world
        # while the other modes are timed (all-in-tee runs there too) or while this model's next run
        # waits for the secure world, and slow them; the offline cost is reported on its own.
        with warnings.catch_warnings():  # verify's weak checks: the report's notes say so, not mid-progress
            warnings.simplefilter("ignore")
            self.model = load(out_dir, num_threads=num_threads, delegate=delegate, verify=verify,
                              background_refill=False)
        self.results = [np.empty(t.shape, t.dtype) for t in self.model.outputs]
        self.stats: list[dict[str, Any]] = []
        self._one_core: Callable[[], None] | None = None
        # On the bench's own input: a verified model's weakest detection bound is over every inference since
        # load, and zeros, which leave a model without biases results at the check's floor (SECURITY.md),
        # reported 2^0 for it (a helper's probe).
        warm_past_trial(self.model, inputs, self.results)
        self.refill()

    def refill(self) -> None:
        self.model.refill_masks()

    def __call__(self, inputs: Sequence[np.ndarray]) -> None:
        self.model.run_into(inputs, self.results)

    def record(self) -> None:
        self.stats.append(self.model.stats())

    def rounds_on_one_core(self) -> None:
        """The accelerator's work on one core, for the bench to time: every round of ``untrusted.tflite`` one
        after the other on a one-thread LiteRT (XNNPACK) interpreter of its own, on random inputs - the unit
        of the break-even k, which compares an accelerator with one TEE core (all-in-tee's). The
        accelerator's own time is on ``num_threads`` threads (or its delegate): against it k came out ~2x
        too small on two cores (a helper's review)."""
        if self._one_core is None:
            self._one_core = self.model.accelerator.rounds_on_one_thread()
        self._one_core()

    def rounds_back_to_back(self) -> float:
        """Seconds the accelerator takes for every round one after the other, with no TEE step between
        them: against the accelerator's share of an inference, what the interleaving costs it. It runs on
        the buffers as the last inference left them (the next one's steps rewrite each round's input
        before its round runs)."""
        run, rounds = self.model.accelerator.run_round, self.model.num_rounds
        start = time.perf_counter()
        for r in range(1, rounds + 1):
            run(r)
        return time.perf_counter() - start

    def close(self) -> None:
        self.model.close()
