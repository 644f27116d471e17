"""Protected inference in the normal world: ``load`` -> ``ProtectedModel``, and the accelerator it drives.

One inference with R rounds (contract: /work/notes/interfaces.md, section 5)::

    inputs -> shm input/i -> TEE step 0 -> for r in 1..R: accelerator round r, TEE step r -> shm output/i

Every array the hot path touches is made once at load: zero-copy numpy views of the registered shared
memory and of LiteRT's input/output tensors of each round's signature, and the TEE parameter lists of
each step. A call then costs: one copy of each model input into shared memory, per round one copy of its
inputs into LiteRT and one of its outputs back, one TEE entry per step, and the copies it returns.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter
from ai_edge_litert.interpreter import load_delegate

import tee_sim
from shadownet.artifacts import Artifacts, RoundSpec, TensorSpec, read_artifacts
from shadownet.exceptions import (
    ArtifactError,
    ClosedError,
    InputError,
    SecureMemoryError,
    SecurityError,
    ShadowNetError,
    TEECommunicationError,
)
from tee_sim import TEEError

# The one place where the secure world's GlobalPlatform codes become the flat exceptions.
_TEE_ERRORS: dict[int, type[ShadowNetError]] = {
    tee_sim.TEE_ERROR_SECURITY: SecurityError,
    tee_sim.TEE_ERROR_ACCESS_DENIED: SecurityError,
    tee_sim.TEE_ERROR_OUT_OF_MEMORY: SecureMemoryError,
    tee_sim.TEE_ERROR_COMMUNICATION: TEECommunicationError,
    tee_sim.TEE_ERROR_TARGET_DEAD: TEECommunicationError,
    tee_sim.TEE_ERROR_BAD_PARAMETERS: ArtifactError,
    tee_sim.TEE_ERROR_BAD_FORMAT: ArtifactError,
    tee_sim.TEE_ERROR_NOT_SUPPORTED: ArtifactError,
    tee_sim.TEE_ERROR_ITEM_NOT_FOUND: ArtifactError,
}
_LOST_SESSION = frozenset({tee_sim.TEE_ERROR_COMMUNICATION, tee_sim.TEE_ERROR_TARGET_DEAD})


def translate_tee_error(exc: TEEError, doing: str) -> ShadowNetError:
    """The flat exception for a ``TEEError`` raised while ``doing`` (e.g. "loading model X")."""
    cls = _TEE_ERRORS.get(exc.code, ShadowNetError)
    detail = exc.message or exc.code_name
    return cls(f"{doing}: the secure world said {exc.code_name}: {detail}")


@contextmanager
def _tee(doing: str) -> Iterator[None]:
    try:
        yield
    except TEEError as exc:
        raise translate_tee_error(exc, doing) from exc


def _commands() -> Any:
    from tee_sim import ta_shadownet_commands

    return ta_shadownet_commands


class Accelerator(Protocol):
    """What ``ProtectedModel`` needs from the untrusted accelerator.

    ``bind(buffers)`` receives the zero-copy views of every shared-memory buffer by name (again after the
    secure world restarted, if the memory had to be registered anew); ``run_round(r)`` (1 <= r <= R) reads
    the buffers ``round_r/in/*`` and writes ``round_r/out/*``; ``close()`` frees what it holds.
    """

    def bind(self, buffers: Mapping[str, np.ndarray]) -> None: ...

    def run_round(self, r: int) -> None: ...

    def close(self) -> None: ...


_Copy = tuple[np.ndarray, np.ndarray]  # (destination, source)


class LiteRTAccelerator:
    """The default accelerator: LiteRT on ``untrusted.tflite``, one signature runner per round.

    XNNPACK is LiteRT's default CPU path; ``delegates`` are ``load_delegate`` objects (e.g. a GPU or NPU
    delegate). Per round it copies the round's inputs from shared memory into LiteRT's input tensors,
    invokes that round's subgraph and copies the outputs back: measured on 4 MobileNet-sized 1x1 convs, this
    beat ``SignatureRunner.__call__`` (which resizes, re-allocates and returns fresh arrays every call) and
    ``SetTensor``/``GetTensor`` (an extra allocation per output).
    """

    def __init__(self, model: bytes, rounds: Sequence[RoundSpec], num_threads: int | None = None,
                 delegates: Sequence[Any] = ()) -> None:
        try:
            self.interpreter = LiteRTInterpreter(model_content=model, num_threads=num_threads,
                                                 experimental_delegates=list(delegates) or None)
        except (ValueError, RuntimeError) as exc:
            raise ArtifactError(f"LiteRT cannot load untrusted.tflite: {exc}") from None
        # The wrapper gives subgraph-indexed tensor views (the public tensor() only reaches subgraph 0);
        # they stay valid because nothing is ever resized after the one allocation below.
        self._wrapper = self.interpreter._interpreter
        self.rounds = tuple(rounds)
        signatures = self.interpreter._get_full_signature_list()
        self._subgraphs: list[int] = []
        self._tensors: list[tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]] = []
        for r in self.rounds:
            sig = signatures.get(r.signature)
            if sig is None or {n for n, _ in r.inputs} != set(sig["inputs"]) \
                    or {n for n, _ in r.outputs} != set(sig["outputs"]):
                raise ArtifactError(f"untrusted.tflite has no signature {r.signature!r} with the manifest's "
                                    "inputs and outputs")
            subgraph = self._wrapper.GetSubgraphIndexFromSignature(r.signature)
            self._wrapper.AllocateTensors(subgraph)
            self._subgraphs.append(subgraph)
            view = self._wrapper.tensor
            self._tensors.append((
                [(buf, view(self._wrapper, sig["inputs"][n], subgraph)) for n, buf in r.inputs],
                [(buf, view(self._wrapper, sig["outputs"][n], subgraph)) for n, buf in r.outputs],
            ))
        self._plan: list[tuple[int, list[_Copy], list[_Copy]]] = []

    def bind(self, buffers: Mapping[str, np.ndarray]) -> None:
        plan = []
        for subgraph, (ins, outs) in zip(self._subgraphs, self._tensors, strict=True):
            for name, tensor in ins + outs:
                buf = buffers[name]
                if buf.shape != tensor.shape or buf.dtype != tensor.dtype:
                    raise ArtifactError(f"buffer {name!r} is {buf.shape} {buf.dtype} but untrusted.tflite's "
                                        f"tensor is {tensor.shape} {tensor.dtype}")
            plan.append((subgraph, [(t, buffers[n]) for n, t in ins], [(buffers[n], t) for n, t in outs]))
        self._plan = plan

    def run_round(self, r: int) -> None:
        subgraph, copy_in, copy_out = self._plan[r - 1]
        for dst, src in copy_in:
            np.copyto(dst, src)
        self._wrapper.Invoke(subgraph)
        for dst, src in copy_out:
            np.copyto(dst, src)

    def close(self) -> None:
        self._plan = []
        self._tensors = []
        self._wrapper = None
        self.interpreter = None


class AcceleratorWrapper:
    """Base for an accelerator that wraps another (to observe, tamper with or check its results).

    Subclass and override ``run_round``; ``self.inner`` is the wrapped accelerator and ``self.buffers``
    the shared-memory views by name. Pass ``accelerator=MyWrapper`` to ``shadownet.load``.
    """

    def __init__(self, inner: Accelerator) -> None:
        self.inner = inner
        self.buffers: Mapping[str, np.ndarray] = {}

    def bind(self, buffers: Mapping[str, np.ndarray]) -> None:
        self.buffers = buffers
        self.inner.bind(buffers)

    def run_round(self, r: int) -> None:
        self.inner.run_round(r)

    def close(self) -> None:
        self.inner.close()


def _delegates(delegate: Any) -> list[Any]:
    if delegate is None:
        return []
    items = delegate if isinstance(delegate, list | tuple) else [delegate]
    loaded = []
    for d in items:
        if isinstance(d, str):
            try:
                loaded.append(load_delegate(d))
            except (ValueError, OSError) as exc:
                raise ArtifactError(f"cannot load the accelerator delegate {d}: {exc}") from None
        else:
            loaded.append(d)
    return loaded


class ProtectedModel:
    """A protected model loaded on this device: call it like a function.

    ``model(x)`` / ``model(x1, x2)`` / ``model({"name": x})`` / ``model.predict(...)`` returns the output
    array (a copy), or a dict keyed by output name when the model has several. Inputs must have exactly
    the original model's shapes and dtypes (``InputError`` otherwise). ``stats()`` describes the last
    call. Calls are serialised by a per-model lock; several models may be open at once. ``close()`` (or
    leaving a ``with`` block) ends the TEE session; later calls raise ``ClosedError``.
    """

    def __init__(self, artifacts: Artifacts, num_threads: int | None = None, delegate: Any = None,
                 accelerator: Callable[[Accelerator], Accelerator] | None = None) -> None:
        self.artifacts = artifacts
        self.inputs: tuple[TensorSpec, ...] = artifacts.inputs
        self.outputs: tuple[TensorSpec, ...] = artifacts.outputs
        self.num_rounds = len(artifacts.rounds)
        self._lock = threading.Lock()
        self._closed = False
        self._session: Any = None
        self._shm: Any = None
        self._context: Any = None
        self._views: dict[str, np.ndarray] = {}
        commands = _commands()
        expected_uuid = uuid.UUID(str(commands.UUID))
        if uuid.UUID(artifacts.ta_uuid) != expected_uuid:
            raise ArtifactError(f"{artifacts.directory} was made for trusted app {artifacts.ta_uuid}, not "
                                f"ShadowNet's ({expected_uuid})")
        self._uuid = expected_uuid
        self._run_step = int(commands.Command.RUN_STEP)
        # Prebuilt once: an inference only passes these lists to invoke_command.
        self._step_params = [[tee_sim.Value(a=s)] for s in range(self.num_rounds + 1)]
        self._input_names = {t.name: i for i, t in enumerate(self.inputs)}
        sig = artifacts.signature
        self._input_names.update({k: self._input_names[v] for k, v in sig.inputs.items()})
        nbytes = {name: b.nbytes for name, b in artifacts.buffers.items()}
        self._bytes_to_tee = sum(nbytes[f"input/{i}"] for i in range(len(self.inputs))) + \
            sum(nbytes[b] for r in artifacts.rounds for _, b in r.outputs)
        self._bytes_from_tee = sum(nbytes[f"output/{i}"] for i in range(len(self.outputs))) + \
            sum(nbytes[b] for r in artifacts.rounds for _, b in r.inputs)
        self._accelerator_args = (num_threads, delegate, accelerator)
        self.accelerator: Accelerator | None = None
        self._last: dict[str, float] = {}
        self._session_before: dict[str, Any] = {}
        self._session_after: dict[str, Any] = {}
        try:
            self._open()
        except BaseException:
            if self.accelerator is not None:
                self.accelerator.close()
            if self._shm is not None:
                _quietly(self._shm.release)
            raise

    def _make_accelerator(self) -> Accelerator:
        num_threads, delegate, wrap = self._accelerator_args
        base = LiteRTAccelerator(self.artifacts.untrusted, self.artifacts.rounds, num_threads,
                                 _delegates(delegate))
        return wrap(base) if wrap is not None else base

    # --- session life cycle -------------------------------------------------------------------------------
    def _open(self) -> None:
        """Open a ShadowNet TA session, load the model, bind the shared memory (again after a crash)."""
        commands = _commands()
        where = f"loading {self.artifacts.directory}"
        context = tee_sim.default_context()
        with _tee(where):
            session = context.open_session(self._uuid)
        try:
            with _tee(where):
                session.invoke_command(commands.Command.LOAD_MODEL, [
                    tee_sim.TempMemRef(self.artifacts.secrets), tee_sim.TempMemRef(self.artifacts.untrusted)])
                if self.accelerator is None:
                    # Only now: the TA has authenticated the pairing, so a swapped untrusted.tflite is
                    # reported as the SecurityError it is, not as a LiteRT or layout error.
                    self.accelerator = self._make_accelerator()
                shm = self._shm
                if shm is None or shm.released or self._context is not context:
                    # First load, or the process's context was closed and replaced: memory registered
                    # with the old one is gone. (After a secure-world restart tee_sim re-registers it.)
                    shm = context.register_shared_memory(self.artifacts.shared_memory_size)
                    self._bind_views(shm)
                    self._context = context
                session.invoke_command(commands.Command.BIND_SHARED_MEMORY, [
                    tee_sim.MemRef(shm, 0, self.artifacts.shared_memory_size, "inout")])
        except BaseException:
            _quietly(session.close)
            raise
        self._session = session

    def _bind_views(self, shm: Any) -> None:
        old = self._shm
        views = {b.name: shm.ndarray(b.dtype, b.shape, b.offset) for b in self.artifacts.buffers.values()}
        try:
            self.accelerator.bind(views)
        except BaseException:
            _quietly(shm.release)
            raise
        self._shm, self._views = shm, views
        self._input_views = [views[f"input/{i}"] for i in range(len(self.inputs))]
        self._output_views = [views[f"output/{i}"] for i in range(len(self.outputs))]
        if old is not None:
            _quietly(old.release)

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            _quietly(session.close)

    def close(self) -> None:
        """End the TEE session, release the shared memory and the accelerator. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_session()
            self._views = {}
            self._input_views = self._output_views = []
            if self._shm is not None:
                _quietly(self._shm.release)
                self._shm = None
            if self.accelerator is not None:
                self.accelerator.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ProtectedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - at interpreter exit modules may already be torn down
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.num_rounds} rounds"
        return f"ProtectedModel({str(self.artifacts.directory)!r}, scheme={self.artifacts.scheme!r}, {state})"

    # --- inference -----------------------------------------------------------------------------------------
    def __call__(self, *inputs: Any) -> np.ndarray | dict[str, np.ndarray]:
        arrays = self.check_inputs(inputs)
        outputs = [np.empty(t.shape, t.dtype) for t in self.outputs]
        self.run_into(arrays, outputs)
        if len(outputs) == 1:
            return outputs[0]
        return {t.name: o for t, o in zip(self.outputs, outputs, strict=True)}

    predict = __call__

    def run_into(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """One inference from checked ``inputs`` into preallocated ``outputs`` (model order, exact shapes and
        dtypes; see ``check_inputs``): the allocation-free path under ``__call__`` and ``Interpreter``."""
        with self._lock:
            self._ensure_open()
            for view, x in zip(self._input_views, inputs, strict=True):
                np.copyto(view, x)
            self._infer()
            for out, view in zip(outputs, self._output_views, strict=True):
                np.copyto(out, view)

    def check_inputs(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """The inputs as arrays in the model's order; InputError on a wrong count, name, shape or dtype."""
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            given = inputs[0]
            unknown = [k for k in given if k not in self._input_names]
            if unknown:
                raise InputError(f"unknown input name(s) {unknown}; the model's inputs are "
                                 f"{[t.name for t in self.inputs]}")
            ordered: list[Any] = [None] * len(self.inputs)
            for key, value in given.items():
                ordered[self._input_names[key]] = value
            missing = [t.name for t, v in zip(self.inputs, ordered, strict=True) if v is None]
            if missing or len(given) != len(self.inputs):
                raise InputError(f"missing input(s) {missing or 'given twice under two names'}; the model "
                                 f"takes {[t.name for t in self.inputs]}")
            inputs = ordered
        if len(inputs) != len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} input(s) "
                             f"{[t.name for t in self.inputs]}, {len(inputs)} given")
        arrays = []
        for spec, x in zip(self.inputs, inputs, strict=True):
            if not isinstance(x, np.ndarray):
                raise InputError(f"input {spec.name!r} must be a numpy array of shape {list(spec.shape)} "
                                 f"{spec.dtype}, not {type(x).__name__}")
            if x.shape != spec.shape or x.dtype != spec.dtype:
                raise InputError(f"input {spec.name!r} must be {list(spec.shape)} {spec.dtype}, "
                                 f"got {list(x.shape)} {x.dtype}")
            arrays.append(x)
        return arrays

    def _ensure_open(self) -> None:
        if self._closed:
            raise ClosedError("this protected model was closed")
        if self._session is None:  # the secure world was lost during an earlier call: start again
            self._open()

    def _infer(self) -> None:
        """Steps 0..R on the inputs already in shared memory; outputs end in the output views. Lock held."""
        session = self._session
        invoke = session.invoke_command
        run_step, params = self._run_step, self._step_params
        accelerator = self.accelerator
        self._session_before = session.stats()
        clock = time.perf_counter
        accelerator_s = tee_s = 0.0
        start = t = clock()
        step = 0
        try:
            invoke(run_step, params[0])
            for r in range(1, self.num_rounds + 1):
                t1 = clock()
                tee_s += t1 - t
                accelerator.run_round(r)
                t = clock()
                accelerator_s += t - t1
                step = r
                invoke(run_step, params[r])
        except TEEError as exc:
            if exc.code in _LOST_SESSION:
                self._drop_session()
            raise translate_tee_error(exc, f"inference step {step}") from exc
        end = clock()
        tee_s += end - t
        self._session_after = session.stats()
        self._last = {"total_s": end - start, "accelerator_s": accelerator_s, "tee_s": tee_s}

    def stats(self) -> dict[str, Any]:
        """Costs of the last call: ``world_switches`` (TEE entries), ``rounds``, ``bytes_to_tee`` /
        ``bytes_from_tee`` (tensors that crossed the boundary through shared memory), ``total_s``,
        ``accelerator_s``, ``tee_s`` (wall time in TEE calls, crossing included), ``ta_s`` (inside the
        trusted app) and ``transport_s`` (the rest of ``tee_s``); the secure world's memory in bytes:
        ``secure_memory_used`` / ``secure_memory_peak`` / ``secure_memory_cap`` for the whole device and
        ``model_secure_memory`` for this model (asked with one extra TEE entry, outside any inference)."""
        with self._lock:
            if self._closed:
                raise ClosedError("this protected model was closed")
            before, after = self._session_before, self._session_after
            result: dict[str, Any] = {"rounds": self.num_rounds, "scheme": self.artifacts.scheme}
            if after:
                ta_s = after["ta_time_s"] - before["ta_time_s"]
                result.update(
                    world_switches=after["invocations"] - before["invocations"],
                    bytes_to_tee=self._bytes_to_tee, bytes_from_tee=self._bytes_from_tee,
                    **self._last, ta_s=ta_s, transport_s=self._last["tee_s"] - ta_s,
                )
            if self._session is not None:
                memory = self._session.stats()
                for key in ("secure_memory_used", "secure_memory_peak", "secure_memory_cap"):
                    result[key] = memory[key]
                command = getattr(_commands().Command, "GET_STATS", None)
                if command is not None:  # this model's own share, one extra TEE entry outside inference
                    out = tee_sim.Value(direction="out")
                    with _tee("reading the trusted app's statistics"):
                        self._session.invoke_command(command, [out])
                    result["model_secure_memory"] = out.a
            return result


def _quietly(func: Callable[[], Any]) -> None:
    try:
        func()
    except (TEEError, ShadowNetError, OSError, BufferError):
        pass


def load(out_dir: Any, num_threads: int | None = None, delegate: Any = None,
         accelerator: Callable[[Accelerator], Accelerator] | None = None) -> ProtectedModel:
    """Load a protected-artifact directory: check it, load its secrets into the TEE, its untrusted part
    on the accelerator (LiteRT; ``num_threads``; ``delegate``: a delegate library path or a LiteRT
    ``Delegate``), and return a ``ProtectedModel``. ``accelerator``: optional ``f(default) -> Accelerator``
    to wrap or replace the default (see ``AcceleratorWrapper``)."""
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive int, not {num_threads!r}")
    return ProtectedModel(read_artifacts(out_dir), num_threads=num_threads, delegate=delegate,
                          accelerator=accelerator)
