"""Seeded mutation fuzzing of every file a user or the normal world hands ShadowNet.

Targets (what is mutated, what is run on it):

- ``tflite``: a float ``.tflite`` given to ``convert`` (then, if it converts, ``load`` and one inference);
- ``untrusted`` / ``secrets`` / ``manifest``: one file of an artifact directory given to ``load`` and one
  inference (for the first two, the manifest's SHA-256 is usually fixed up, as an attacker who owns the
  normal world would, so the secure world's own checks are what refuses);
- ``program``: the TEE program (the plaintext inside ``secrets.sealed``), provisioned to the device's
  trusted app as a vendor would, then ``load`` and one inference: what a converter of another version
  produces (stale or newer format) must be refused with a clear error, never crash the trusted app.

Each case must end in one of ``shadownet.exceptions``'s errors, or succeed with outputs that match LiteRT
on the (mutated) original model. A segfault, a hang, a traceback of another exception type, a secure
world that dies (``TEECommunicationError``), the bare base class ``ShadowNetError`` or a wrong result is a
failure. Two outcomes are accepted and counted apart: ``imprecise`` (``tflite``: the mutation made one weight
huge, below the converter's limit, and float32 masking then keeps fewer digits of that layer's small outputs)
and ``differs`` (``program``: an authentic program that computes something else - anyone may provision one,
with their own data only: SECURITY.md).
Cases run in a worker subprocess (``--worker``) so that a crash in native code (LiteRT) is seen
and reported instead of killing the driver; the driver restarts the worker after the case that crashed.

Mutations are drawn from ``numpy.random.default_rng([seed, target, index])``: a case is reproduced from
its seed and index alone. Byte level: bit flips, byte overwrites, truncations, splices of two files,
insertions and deletions. Structure aware: flatbuffer vector / string lengths, offsets, scalar fields and
index vectors (positions found by reading the file with an instrumented flatbuffer table), the
container headers of ``secrets.sealed`` and of the program, and JSON type confusion, key deletion,
unknown keys and numeric tweaks in ``manifest.json`` and the program's header.

``python -m shadownet.fuzz --cases N --seed S [--target T ...]`` runs a campaign and prints the counts.
This module is the driver; the mutations are in ``shadownet.fuzz_mutations``, the cases (seeds, prepared
inputs, the worker that runs and judges them) in ``shadownet.fuzz_worker``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadownet.fuzz_worker import TARGETS, Result, prepare, worker_main

CASE_TIMEOUT = 60.0  # seconds one case may take before it counts as a hang (generous: a busy machine)


# ------------------------------------------------------------------------------------------------ driver

@dataclass
class Report:
    target: str
    seed: int
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.failed]

    def counts(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items()))
        return (f"{self.target}: {len(self.results)} cases (seed {self.seed}) in {self.seconds:.0f} s, "
                f"{len(self.failures)} failed: {counts}")


def _worker_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SHADOWNET_HOME"] = str(work / "home")
    env["SHADOWNET_TEE_TRANSPORT"] = "inprocess"  # a TA crash then kills the worker: seen, not hidden
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_campaign(target: str, cases: int, seed: int, work: str | os.PathLike, start: int = 0,
                 timeout: float = CASE_TIMEOUT, progress: bool = False) -> Report:
    """Run cases ``start .. start + cases - 1`` of ``target`` in worker subprocesses (restarted after a
    crash or a hang); ``work`` holds the prepared inputs (``prepare`` is called if needed)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
    work = Path(work)
    prepare(work)
    report = Report(target, seed)
    begin = time.perf_counter()
    index, stop = start, start + cases
    while index < stop:
        read_fd, write_fd = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-m", "shadownet.fuzz", "--worker", target, "--seed", str(seed), "--work",
             str(work), "--start", str(index), "--stop", str(stop), "--channel", str(write_fd)],
            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=_worker_env(work), start_new_session=True)
        os.close(write_fd)
        index = _follow(proc, read_fd, report, index, stop, timeout, progress)
    report.seconds = time.perf_counter() - begin
    return report


def _follow(proc: subprocess.Popen, fd: int, report: Report, index: int, stop: int, timeout: float,
            progress: bool) -> int:
    """Read one worker's reports until it ends; return the next case to run."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    running: dict[str, Any] | None = None
    deadline = time.monotonic() + 120.0  # the worker's start-up: imports and reading the seeds
    buffered = ""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill(proc)
                if running is None:
                    raise RuntimeError("the fuzz worker did not start")
                report.results.append(Result(running["start"], "hang", running["mutation"],
                                             f"no answer within {timeout:g} s"))
                return running["start"] + 1
            if not poller.poll(remaining * 1000):
                continue
            chunk = os.read(fd, 65536).decode()
            if not chunk:  # the worker ended
                code = proc.wait()
                if running is None:
                    if code != 0 and index < stop:
                        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                        raise RuntimeError(f"the fuzz worker failed (exit {code}): {err}")
                    return stop
                err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
                what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                report.results.append(Result(running["start"], "crash", running["mutation"],
                                             f"{what}: {err.strip()}"))
                return running["start"] + 1
            buffered += chunk
            *lines, buffered = buffered.split("\n")
            for line in lines:
                message = json.loads(line)
                if "start" in message:
                    running = message
                    deadline = time.monotonic() + timeout
                else:
                    assert running is not None
                    result = Result(message["index"], message["outcome"], running["mutation"],
                                    message["detail"])
                    report.results.append(result)
                    index = result.index + 1
                    running = None
                    if progress and result.failed:
                        print(f"  FAILED case {result.index}: {result.outcome} [{result.mutation}] "
                              f"{result.detail}", flush=True)
    finally:
        os.close(fd)
        if proc.poll() is None:
            _kill(proc)
        if proc.stderr:
            proc.stderr.close()


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadownet.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per target (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="append", choices=TARGETS, help="repeatable; default: all")
    parser.add_argument("--work", help="directory for the seeds and artifacts (default: temporary)")
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT, help="seconds before a case hangs")
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--channel", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.seed, Path(args.work), args.start, args.stop, args.channel)
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="shadownet-fuzz-") as tmp:
        work = Path(args.work or tmp)
        for target in args.target or TARGETS:
            report = run_campaign(target, args.cases, args.seed, work, timeout=args.timeout, progress=True)
            print(report.summary(), flush=True)
            for r in report.failures[:20]:
                print(f"  case {r.index}: {r.outcome} [{r.mutation}] {r.detail}")
            failed += len(report.failures)
    print(f"{'FAILED' if failed else 'passed'}: {failed} failing case(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
