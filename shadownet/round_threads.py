"""The trial, on a protected model's first real inferences, of the choice its default accelerator made at load
of which small rounds run on one thread (``shadownet.accelerator.LiteRTAccelerator``: why, and how the load
times them)."""

from __future__ import annotations

import numpy as np

from shadownet.accelerator import LiteRTAccelerator


class RoundThreadsTrial:
    """The one-thread choice of a ``LiteRTAccelerator``'s small rounds, tried on real inferences.

    The load-time timing stands in for the TEE step before each round with a busy pause
    (``TUNE_PAUSE_S``); whether XNNPACK's workers are still awake when a round starts depends on how long
    the real step took, on the machine and on whether results are verified. So the runtime reports each
    inference's accelerator time here, over ``PHASES`` phases of 1 + ``RUNS`` inferences (the first of
    each not timed: the session's first, or the first after a move, whose pages fault in): as chosen at
    load, then every round on ``num_threads``, and again both (machine drift hits both alike); the medians
    decide. ``record`` returns True when the rounds moved: their tensors are another interpreter's, and the
    runtime places the buffers again to share those tensors' pages, and binds. (Bound to the same buffers
    instead, the moved rounds' tensors were copied, 3.6 MB per ResNet-44 inference: that arm measured 1.6-1.9
    ms against 1.0 placed, and lost when it should have won.) A placement costs about what the load's did,
    in the inference call that ends the phase: ResNet-404 170-200 ms, ResNet-44 15-21 ms, three times in
    the first 20 calls.
    Measured on a Zen 5 VM (2 threads, medians of 50 inferences, alternated): the load-time timing put
    43-44 of ResNet-44's 44 rounds on one thread, 403 of ResNet-404's 404; on two, unverified, ResNet-44
    1.9-2.1 -> 1.4-1.5 ms, ResNet-404 19.1-19.5 -> 14.6-15.4 ms (real steps of ~15 us: the workers still
    awake); verified (~40 us steps) within 5% either way.
    """

    RUNS = 4
    PHASES = 4  # as chosen, all on num_threads, as chosen, all on num_threads

    def __init__(self, accelerator: LiteRTAccelerator) -> None:
        self.accelerator = accelerator
        self.chosen = accelerator.round_threads
        self.other = (accelerator.num_threads,) * len(self.chosen)
        self.times: tuple[list[float], list[float]] = ([], [])  # as chosen, all on num_threads
        self.calls = 0
        self.done = False

    def record(self, accelerator_s: float | None) -> bool:
        """One inference's accelerator seconds; True when the rounds moved (class docstring)."""
        phase, step = divmod(self.calls, 1 + self.RUNS)
        self.calls += 1
        if step > 0 and accelerator_s is not None:  # the first of each phase is not timed
            self.times[phase % 2].append(accelerator_s)
        if step < self.RUNS:
            return False
        if phase + 1 < self.PHASES:
            self.accelerator.use(self.chosen if phase % 2 else self.other)
            return True
        self.done = True  # the last phase ran on num_threads
        if np.median(self.times[1]) < np.median(self.times[0]):
            self.accelerator.release_unused()
            return False  # the rounds stay where they were tried
        self.accelerator.use(self.chosen)
        return True
