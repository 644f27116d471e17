"""Session-wide inputs shared by the test packages: one export of each zoo model (exporting resnet404 alone
takes one to two minutes) and one prepared fuzzing work directory."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

# Started with SIGINT ignored (a background job of a non-interactive shell), every child the tests start
# would ignore it too (an ignored signal stays so across exec), and the tests that interrupt a command
# failed or passed without interrupting anything (a helper's audit). Python's own handler instead: a child
# then starts with the default, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``exported(name)``: the path of zoo model ``name`` exported with seed 0 (exported on first use)."""
    pytest.importorskip("tensorflow")
    from models.zoo import export

    directory = tmp_path_factory.mktemp("zoo")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            path = directory / f"{name}.tflite"
            export(name, path, seed=0, verbose=False)
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def fuzz_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seed models, a device home and fuzz artifacts (``shadownet.fuzz_worker.prepare``), made once for the
    convert campaign and the artifact campaigns; the campaigns only read them."""
    from shadownet import fuzz_worker

    work = tmp_path_factory.mktemp("fuzz")
    fuzz_worker.prepare(work)
    return work

