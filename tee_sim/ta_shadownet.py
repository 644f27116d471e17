"""The ShadowNet trusted app: runs the secret part of a protected model inside the secure world.

LOAD_MODEL opens ``secrets.sealed`` (sealed for this device, or provisioned to it), checks that the
paired ``untrusted.tflite`` has the SHA-256 the vendor sealed, parses the TEE program
(``converters.program``, never pickle) and allocates every buffer once against the secure-memory cap.
BIND_SHARED_MEMORY resolves the shared buffer layout to zero-copy views. RUN_STEP k then executes step
k's instructions, prebuilt as closures over preallocated arrays, so an inference allocates nothing:

- ``restore``: accelerator output y' -> ``y = sum_j coef_j * y'[..., index_j] + offset`` (offset = bias
  minus the pop mask, precombined offline; the bias alone, per channel, where no static mask is popped),
  then the fused activation, in place;
- ``push``: ``dst = x[..., permutation] + mask`` (or the input channels mixed,
  ``x'[..., c] = sum_j input_coef[j, c] * x[..., input_index[j, c]]``, as block matmuls; no mask on a
  round the scheme leaves unmasked) into the next round's shared input buffer - the result is computed
  in secure memory (or written element by element by one ufunc), so no value before its permutation,
  mixing and mask ever lands in shared memory, not even transiently;
- ``copy``: between secure slots, LiteRT's tensors and the shared input/output buffers;
- ``litert``: one signature of the TEE-side ``.tflite`` that holds the step's other ops (LiteRT gives
  their exact semantics: PAD, CONCATENATION, RESIZE_BILINEAR, MEAN, SOFTMAX, ...), invoked in place on
  tensors whose buffers the restores and copies write directly.

Why this split (measured on MobileNet-sized tensors, one core): numpy's ``take`` gather + in-place
multiply-add beats LiteRT's GATHER/MUL/ADD for the restore; a matmul against the dense ``[M, N]`` restore
matrix does the same in one pass and wins while the matrix is small (few channels), the gather wins at
large channel counts; both are exact (the matrix holds the same coefficients and zeros). A restore that
is block diagonal over contiguous channel ranges (group-mixing schemes) runs as one small matmul per block.
Gathers use ``mode="wrap"``: every index is checked once at bind time, and numpy's wrap loop is ~1.4x
faster than its clip loop (0.83 vs 1.20 ns an element, 3136 x 128 of 153 channels).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters.program import ProgramFormatError, read_program
from tee_sim.errors import (
    TEE_ERROR_BAD_FORMAT,
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_NOT_SUPPORTED,
    TEE_ERROR_SECURITY,
    TEE_ERROR_SHORT_BUFFER,
    TEEC_ORIGIN_TRUSTED_APP,
    TEEError,
)
from tee_sim.params import (
    TEE_PARAM_TYPE_MEMREF_INOUT,
    TEE_PARAM_TYPE_MEMREF_INPUT,
    TEE_PARAM_TYPE_MEMREF_OUTPUT,
    TEE_PARAM_TYPE_VALUE_INPUT,
    TEE_PARAM_TYPE_VALUE_OUTPUT,
    TAParams,
    TEEParam,
    check_param_types,
)
from tee_sim.per_inference import PerInference
from tee_sim.ta import TrustedApp
from tee_sim.ta_shadownet_commands import (
    LOAD_FAIL_WHEN_EMPTY,
    LOAD_VERIFY,
    LOAD_WEIGHTS_OUTSIDE,
    MAX_POOL_CAPACITY,
    PROVISIONED,
    SEALED,
    SECRETS_AAD,
    SECRETS_MAGIC,
    UUID,
    Command,
)

MEMREF_IN, MEMREF_OUT = TEE_PARAM_TYPE_MEMREF_INPUT, TEE_PARAM_TYPE_MEMREF_OUTPUT
MEMREF_INOUT = TEE_PARAM_TYPE_MEMREF_INOUT
VALUE_IN, VALUE_OUT = TEE_PARAM_TYPE_VALUE_INPUT, TEE_PARAM_TYPE_VALUE_OUTPUT
_LOAD_WITH_OPTIONS = MEMREF_IN | MEMREF_IN << 4 | VALUE_IN << 8  # LOAD_MODEL with its options value
_LOAD_WITH_MANIFEST = _LOAD_WITH_OPTIONS | MEMREF_IN << 12  # ... and the manifest's digest
PROGRAM_FORMAT = "shadownet-tee-program"
# A matmul restore reads the [M, N] matrix once per output pixel; below this many matrix entries it beats
# the 2-3 gather passes (measured: benchmarks in the converter tests' notes; both are exact).
MATMUL_MAX_ENTRIES = 2048
# A restore whose matrix is block diagonal (contiguous source channels -> contiguous output channels,
# e.g. a scheme that mixes groups of channels) runs as one small matmul per block, writing its output
# slice in place: 3-5x faster than k gather passes at k = 4-16 terms (MobileNet-sized layers, one core).
# Used when the blocks are at least this wide on average and cost at most this many multiply-adds per
# output element (a fully dense restore costs M).
BLOCK_MIN_MEAN_WIDTH = 4
BLOCK_MAX_MACS_PER_OUTPUT = 64
ACTIVATIONS = frozenset({"RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU"})
BINARY_UFUNCS = {"ADD": np.add, "SUB": np.subtract, "MUL": np.multiply, "MAXIMUM": np.maximum,
                 "MINIMUM": np.minimum}


def _activation(kind: str | None, alpha: Any, tmp: np.ndarray) -> Callable[[np.ndarray], Any] | None:
    """The in-place activation of a restore (LiteRT's float results: clamps, and for LEAKY_RELU with
    0 <= alpha <= 1, max(x, alpha * x) == (x > 0 ? x : alpha * x))."""
    if kind is None:
        return None
    if kind == "RELU":
        return lambda x: np.maximum(x, 0, out=x)
    if kind == "RELU6":
        return lambda x: np.clip(x, 0, 6, out=x)
    if kind == "RELU_N1_TO_1":
        return lambda x: np.clip(x, -1, 1, out=x)
    if kind == "LEAKY_RELU" and isinstance(alpha, float) and 0 <= alpha <= 1:
        a = np.float32(alpha)

        def leaky(x: np.ndarray) -> None:
            scaled = tmp[:x.size].reshape(x.shape)
            np.multiply(x, a, out=scaled)
            np.maximum(x, scaled, out=x)
        return leaky
    raise ValueError(f"activation {kind!r} (alpha {alpha!r}) cannot be fused into a restore")


def _activation_into(kind: str, alpha: Any, src: np.ndarray, dst: np.ndarray) -> Callable[[], Any]:
    """``dst = activation(src)`` in one pass (the same float32 results as ``_activation``)."""
    if kind == "RELU":
        return lambda: np.maximum(src, 0, out=dst)
    if kind == "RELU6":
        return lambda: np.clip(src, 0, 6, out=dst)
    if kind == "RELU_N1_TO_1":
        return lambda: np.clip(src, -1, 1, out=dst)
    if kind == "LEAKY_RELU" and isinstance(alpha, float) and 0 <= alpha <= 1:
        a = np.float32(alpha)

        def leaky() -> None:
            np.multiply(src, a, out=dst)
            np.maximum(dst, src, out=dst)
        return leaky
    raise ValueError(f"activation {kind!r} (alpha {alpha!r}) is not one the TA runs")

def _error(code: int, message: str) -> TEEError:
    return TEEError(code, TEEC_ORIGIN_TRUSTED_APP, message)


def _bad_format(message: str) -> TEEError:
    # An authenticated program this TA cannot use was made by a converter of another version.
    return _error(TEE_ERROR_BAD_FORMAT, f"TEE program not understood by this trusted app ({message}): "
                                        "re-convert the model with this version of shadownet")


def _write(param: TEEParam, data: bytes) -> None:
    if len(data) > param.buffer.nbytes:
        param.size = len(data)
        raise _error(TEE_ERROR_SHORT_BUFFER, f"need {len(data)} bytes")
    param.buffer[:len(data)] = data
    param.size = len(data)


@dataclass
class _Model:
    """One loaded model: the program, its secure buffers, and (once bound) the compiled steps."""

    program: dict[str, Any]
    arrays: dict[str, np.ndarray]
    views: dict[str, np.ndarray] = field(default_factory=dict)  # slot:/in:/out: name -> array
    held: list[np.ndarray] = field(default_factory=list)  # secure allocations, freed on unload
    reserved: int = 0
    interpreter: Any = None
    subgraphs: dict[str, int] = field(default_factory=dict)
    scratch: np.ndarray | None = None
    chunk: int = 0  # elements of each of the scratch's three chunk buffers
    matrices: dict[str, np.ndarray] = field(default_factory=dict)  # restore (by offset array) -> [M, N]
    blocks: dict[str, list[tuple[slice, slice, np.ndarray]]] = field(default_factory=dict)  # -> block matmuls
    mixings: dict[str, tuple[np.ndarray | None, list[tuple[slice, slice, np.ndarray]]]] = field(
        default_factory=dict)  # input mixing (by index array) -> (gather order, block matmuls)
    steps: list[list[Callable[[], Any]]] | None = None
    shm: dict[str, np.ndarray] = field(default_factory=dict)
    next_step: int = 0
    online: PerInference | None = None  # one-time masks and integrity checks (tee_sim.per_inference)
    shared: bytes | None = None  # key of the program it shares with other sessions (ShadowNetTA._programs)


@dataclass
class _SharedProgram:
    """A decrypted program, held once for every session that loaded the same ``secrets.sealed``."""

    program: dict[str, Any]
    arrays: dict[str, np.ndarray]
    nbytes: int
    users: int = 0


class ShadowNetTA(TrustedApp):
    """The trusted app of protected inference (commands: ``tee_sim.ta_shadownet_commands``)."""

    UUID = UUID
    VERSION = 1
    SIGNER = "shadownet"
    CODE_MODULES = ("converters.program", "tee_sim.per_inference", "tee_sim.freivalds",
                    "tee_sim.ta_shadownet_commands")

    def create(self) -> None:
        # Sessions that load the same secrets (e.g. two frames in flight) share the read-only program:
        # a second copy of the masks and offsets would double the secure memory for nothing.
        self._programs: dict[bytes, _SharedProgram] = {}

    def open_session(self, params: TAParams) -> dict[str, Any]:
        check_param_types(params)
        return {"model": None}

    def close_session(self, session: dict[str, Any]) -> None:
        self._unload(session)

    def invoke_command(self, session: dict[str, Any], cmd_id: int, params: TAParams) -> None:
        if cmd_id == Command.RUN_STEP:  # the hot path first
            check_param_types(params, VALUE_IN)
            self._run_step(session, params[0].a)
        elif cmd_id == Command.LOAD_MODEL:
            manifest = None
            if params.types == _LOAD_WITH_MANIFEST:
                flags, capacity, manifest = params[2].a, params[2].b, bytes(params[3].buffer)
            elif params.types == _LOAD_WITH_OPTIONS:
                flags, capacity = params[2].a, params[2].b
            else:
                check_param_types(params, MEMREF_IN, MEMREF_IN)
                flags, capacity = 0, 0
            self._load(session, params[0].buffer, params[1].buffer, flags, capacity, manifest)
        elif cmd_id == Command.REFILL_POOL:
            check_param_types(params, VALUE_IN, VALUE_OUT)
            self._refill(session, params[0], params[1])
        elif cmd_id == Command.BIND_WEIGHTS:
            check_param_types(params, MEMREF_IN)
            model = session.get("model")
            if model is None or model.online is None or not model.online.weights.outside:
                raise _error(TEE_ERROR_BAD_STATE, "no model loaded with its weights outside")
            model.online.weights.bind(np.frombuffer(params[0].buffer, np.uint8))
        elif cmd_id == Command.GET_POOL_STATS:
            check_param_types(params, MEMREF_OUT)
            model = session.get("model")
            stats = model.online.stats() if model is not None and model.online is not None else {}
            _write(params[0], json.dumps(stats).encode())
        elif cmd_id == Command.BIND_SHARED_MEMORY:
            check_param_types(params, MEMREF_INOUT)
            self._bind(session, params[0])
        elif cmd_id == Command.GET_STATS:
            check_param_types(params, VALUE_OUT)
            stats = self.tee.memory_stats()
            params[0].a, params[0].b = stats["ta_used"], stats["peak"]
        elif cmd_id == Command.GET_REPORT:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            _write(params[1], self.tee.attestation_report(bytes(params[0].buffer)).to_bytes())
        elif cmd_id == Command.PROVISION:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            self._provision(params[0].buffer, params[1])
        else:
            raise _error(TEE_ERROR_NOT_SUPPORTED, f"unknown command {cmd_id}")

    # Provisioning and loading.
    def _provision(self, envelope: memoryview, out: TEEParam) -> None:
        # The plaintext is held in secure memory while it is checked and re-sealed.
        self.tee.reserve(envelope.nbytes)
        try:
            plaintext = self.tee.open_provisioned(bytes(envelope), SECRETS_AAD)
            try:
                read_program(plaintext)
            except ProgramFormatError as exc:
                raise _bad_format(str(exc)) from None
            sealed = SECRETS_MAGIC + SEALED + self.tee.seal(plaintext, SECRETS_AAD)
            del plaintext
        finally:
            self.tee.unreserve(envelope.nbytes)
        _write(out, sealed)

    def _open_secrets(self, blob: memoryview) -> bytes:
        head = bytes(blob[:len(SECRETS_MAGIC) + 1])
        if len(head) != len(SECRETS_MAGIC) + 1 or head[:-1] != SECRETS_MAGIC:
            raise _error(TEE_ERROR_SECURITY, "secrets failed authentication")
        payload = bytes(blob[len(head):])
        if head[-1:] == SEALED:
            return self.tee.unseal(payload, SECRETS_AAD)
        if head[-1:] == PROVISIONED:
            return self.tee.open_provisioned(payload, SECRETS_AAD)
        raise _error(TEE_ERROR_SECURITY, "secrets failed authentication")

    def _load(self, session: dict[str, Any], blob: memoryview, untrusted: memoryview, flags: int = 0,
              capacity: int = 0, manifest: bytes | None = None) -> None:
        self._unload(session)
        key = hashlib.sha256(blob).digest()  # the very bytes another session loaded: authentic too
        shared = self._programs.get(key)
        if shared is None:
            shared = self._open_program(blob)
        if hashlib.sha256(untrusted).hexdigest() != shared.program.get("untrusted_sha256"):
            if not shared.users:
                self.tee.unreserve(shared.nbytes)
            raise _error(TEE_ERROR_SECURITY, "the untrusted model is not the one these secrets were made for")
        sealed_manifest = shared.program.get("manifest_sha256")
        if manifest is not None and sealed_manifest is not None and manifest.hex() != sealed_manifest:
            if not shared.users:
                self.tee.unreserve(shared.nbytes)
            raise _error(TEE_ERROR_SECURITY, "manifest.json is not the one converted with these secrets "
                                             "(edited or damaged)")
        self._programs[key] = shared
        shared.users += 1
        model = _Model(shared.program, dict(shared.arrays), shared=key)
        try:
            self._per_inference(model, untrusted, flags, capacity)
            self._build(model)
        except TEEError:
            self._free(model)
            raise
        except Exception as exc:  # noqa: BLE001 - an authenticated program that does not fit together
            self._free(model)
            raise _bad_format(f"{type(exc).__name__}: {exc}") from None
        session["model"] = model

    def _open_program(self, blob: memoryview) -> _SharedProgram:
        # The plaintext (about the blob's size) lands in secure memory; the ciphertext is read from the
        # normal world's buffer (tee_sim copies it, a real TEE decrypts it in place, block by block).
        self.tee.reserve(blob.nbytes)
        try:
            plaintext = self._open_secrets(blob)
        finally:
            self.tee.unreserve(blob.nbytes)
        try:
            program, arrays = read_program(plaintext)
        except ProgramFormatError as exc:
            raise _bad_format(str(exc)) from None
        if program.get("format") != PROGRAM_FORMAT:
            raise _bad_format(f"format is not {PROGRAM_FORMAT!r}")
        # The arrays are zero-copy views of the plaintext, which so stays (and counts) in secure memory.
        self.tee.reserve(len(plaintext))
        return _SharedProgram(program, arrays, len(plaintext))

    def _per_inference(self, model: _Model, untrusted: memoryview, flags: int, capacity: int) -> None:
        """One-time masks and integrity checks: their live buffers join the program's arrays under the
        names the instructions use, so pushes and restores compile as usual (``tee_sim.per_inference``)."""
        p = model.program
        known = LOAD_VERIFY | LOAD_FAIL_WHEN_EMPTY | LOAD_WEIGHTS_OUTSIDE
        if flags & ~known or capacity > MAX_POOL_CAPACITY:
            raise _error(TEE_ERROR_BAD_PARAMETERS, f"load options 0x{flags:x} / pool of {capacity}")
        if not (p.get("one_time") or {}).get("masks") and not flags & LOAD_VERIFY:
            return
        try:
            shapes = {name: tuple(spec["shape"]) for name, spec in p["shared_buffers"].items()}
            online = PerInference(p, model.arrays, shapes, untrusted, lambda s, d: self._alloc(model, s, d),
                                  self.tee.random_bytes, verify=bool(flags & LOAD_VERIFY), capacity=capacity,
                                  fail_when_empty=bool(flags & LOAD_FAIL_WHEN_EMPTY),
                                  weights_outside=bool(flags & LOAD_WEIGHTS_OUTSIDE))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _bad_format(f"per-inference material: {type(exc).__name__}: {exc}") from None
        model.arrays = {**model.arrays, **online.live}
        online.attach(model.arrays)
        model.online = online

    def _refill(self, session: dict[str, Any], request: TEEParam, out: TEEParam) -> None:
        """REFILL_POOL: make pool entries for up to ``a`` microseconds (0: until full), at most ``b``
        entries (0: no limit); out: a = ready entries, b = capacity."""
        model = session.get("model")
        if model is None:
            raise _error(TEE_ERROR_BAD_STATE, "no model loaded")
        online = model.online
        if online is None or not online.enabled:
            out.a, out.b = 0, 0
            return
        budget = request.a / 1e6 if request.a else None
        out.a, out.b = online.refill(budget, request.b), online.capacity

    def _unload(self, session: dict[str, Any]) -> None:
        model = session.get("model")
        session["model"] = None
        if model is not None:
            self._free(model)

    def _free(self, model: _Model) -> None:
        model.steps = None
        model.online = None
        model.views.clear()
        model.shm.clear()
        model.interpreter = None
        model.matrices.clear()
        model.blocks.clear()
        model.mixings.clear()
        for array in model.held:
            self.tee.free(array)
        model.held.clear()
        self.tee.unreserve(model.reserved)
        model.reserved = 0
        key, model.shared = model.shared, None
        shared = self._programs.get(key) if key is not None else None
        if shared is not None:
            shared.users -= 1
            if shared.users <= 0:
                del self._programs[key]
                self.tee.unreserve(shared.nbytes)

    def _alloc(self, model: _Model, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        array = self.tee.alloc(shape, dtype)
        model.held.append(array)
        return array

    def _build(self, model: _Model) -> None:
        """Allocate the secure arena and LiteRT's tensors, resolve every name the program uses."""
        p = model.program
        try:
            arena_size = _count(p["arena_size"])
            arena = self._alloc(model, arena_size, np.uint8)
            for name, spec in p["slots"].items():
                model.views[f"slot:{name}"] = _view(arena, spec, f"slot {name!r}")
            for name, spec in p["shared_buffers"].items():
                _check_spec(spec, _count(p["shared_memory_size"]), f"shared buffer {name!r}")
            if p["tee_model"] is not None:
                self._build_litert(model, p)
            restores = [i for step in p["steps"] for i in step if i["op"] == "restore"]
            chunk = max([1] + [_chunk_elements(self._restore_shape(model, i)) for i in restores]
                        + [_chunk_elements(self._shape(model, i["src"])) for step in p["steps"] for i in step
                           if i["op"] == "push" and (i["permutation"] is not None or i.get("input_index"))])
            model.chunk = chunk
            scratch = 3 * chunk
            padded_pools = [i for step in p["steps"] for i in step
                            if i["op"] == "max_pool" and any(map(any, i["pad"]))]
            for i in padded_pools:
                shape = self._shape(model, i["srcs"][0])
                (top, bottom), (left, right) = i["pad"]
                scratch = max(scratch, shape[0] * (shape[1] + top + bottom) * (shape[2] + left + right)
                              * shape[3])
            model.scratch = self._alloc(model, scratch, np.float32)
            for i in (i for step in p["steps"] for i in step if i.get("input_index")):
                index, coef = model.arrays[i["input_index"]], model.arrays[i["input_coef"]]
                plan = block_matmuls(index, coef, index.shape[1], gather=True)
                if plan is not None:
                    model.mixings[i["input_index"]] = (plan[0], [(rows, cols, self._keep(model, matrix))
                                                                 for rows, cols, matrix in plan[1]])
            for i in restores:
                m = p["shared_buffers"][i["src"].removeprefix("shm:")]["shape"][-1]
                n = model.arrays[i["index"]].shape[1]
                if m * n <= MATMUL_MAX_ENTRIES:
                    perm = self._permutation(model, i.get("permutation"), n)
                    model.matrices[i["offset"]] = self._restore_matrix(model, i, m, perm)
                    continue
                blocks = restore_blocks(model.arrays[i["index"]], model.arrays[i["coef"]], m)
                if blocks is not None:
                    model.blocks[i["offset"]] = [(rows, cols, self._keep(model, matrix))
                                                 for rows, cols, matrix in blocks]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _bad_format(f"{type(exc).__name__}: {exc}") from None

    def _build_litert(self, model: _Model, p: dict[str, Any]) -> None:
        from ai_edge_litert.interpreter import Interpreter

        tflite = bytes(model.arrays[p["tee_model"]])
        # LiteRT's arenas live in secure memory too; the converter computed their size (an upper bound).
        self.tee.reserve(_count(p["tee_model_arena_bytes"]))
        model.reserved += _count(p["tee_model_arena_bytes"])
        # One thread: a TEE has one core for this TA.
        interpreter = Interpreter(model_content=tflite, num_threads=1)
        wrapper = interpreter._interpreter
        signatures = interpreter._get_full_signature_list()
        for key, spec in p["signatures"].items():
            sub = wrapper.GetSubgraphIndexFromSignature(key)
            wrapper.AllocateTensors(sub)
            model.subgraphs[key] = sub
            for side in ("inputs", "outputs"):
                for name, shape in spec[side].items():
                    index = signatures[key][side][name]
                    view = wrapper.tensor(wrapper, index, sub)
                    if list(view.shape) != shape or view.dtype != np.float32:
                        raise ValueError(f"signature {key} {side[:-1]} {name}: {view.shape} {view.dtype}")
                    model.views[f"{'in' if side == 'inputs' else 'out'}:{key}:{name}"] = view
        model.interpreter = interpreter

    def _shape(self, model: _Model, ref: str) -> tuple[int, ...]:
        if ref.startswith("shm:"):
            return tuple(model.program["shared_buffers"][ref[4:]]["shape"])
        return self._ref(model, ref).shape

    def _restore_shape(self, model: _Model, instr: dict[str, Any]) -> tuple[int, ...]:
        """What a restore writes: its destination, less the border a fused push pads."""
        shape = self._shape(model, instr["dst"])
        pad = instr.get("pad")
        if pad is None:
            return shape
        return tuple(n - before - after for n, (before, after) in zip(shape, pad, strict=True))

    def _keep(self, model: _Model, array: np.ndarray) -> np.ndarray:
        kept = self._alloc(model, array.shape, array.dtype)
        kept[...] = array
        return kept

    def _restore_matrix(self, model: _Model, instr: dict[str, Any], m: int,
                        perm: np.ndarray | None) -> np.ndarray:
        """The restore as a dense ``[M, N]`` matrix, its columns in the output's channel order."""
        index, coef = model.arrays[instr["index"]], model.arrays[instr["coef"]]
        if index.min(initial=0) < 0 or index.max(initial=0) >= m:
            raise ValueError(f"restore {instr['src']}: index out of range")
        if perm is not None:
            index, coef = index[:, perm], coef[:, perm]
        matrix = self._alloc(model, (m, index.shape[1]), np.float32)
        columns = np.arange(index.shape[1])
        for j in range(index.shape[0]):
            matrix[index[j], columns] += coef[j]
        return matrix

    # Shared memory and steps.
    def _bind(self, session: dict[str, Any], param: TEEParam) -> None:
        model = session.get("model")
        if model is None:
            raise _error(TEE_ERROR_BAD_STATE, "no model loaded")
        p = model.program
        if param.buffer.nbytes < p["shared_memory_size"]:
            raise _error(TEE_ERROR_BAD_PARAMETERS,
                         f"shared memory of {param.buffer.nbytes} bytes, the layout needs "
                         f"{p['shared_memory_size']}")
        model.steps = None
        try:
            rounds = {name.split("/")[0] for name in p["shared_buffers"] if name.startswith("round_")}
            if len(p["steps"]) != len(rounds) + 1:
                raise ValueError(f"{len(p['steps'])} steps for {len(rounds)} rounds")
            # Kept past this call, as the ShadowNet contract says: the runtime keeps the memory registered
            # for the session's lifetime and the TA drops these views when the session closes.
            model.shm = {name: param.ndarray(spec["dtype"], tuple(spec["shape"]), spec["offset"])
                         for name, spec in p["shared_buffers"].items()}
            model.steps = [[self._compile(model, instr) for instr in step] for step in p["steps"]]
        except TEEError:
            model.shm = {}
            raise
        except Exception as exc:  # noqa: BLE001 - an authenticated program that does not fit together
            model.shm = {}
            raise _bad_format(f"{type(exc).__name__}: {exc}") from None
        model.next_step = 0

    def _ref(self, model: _Model, ref: str) -> np.ndarray:
        ref, _, part = ref.partition("@")  # "slot:tN@axis:start:stop": a slice of a slot
        if ref.startswith("shm:"):
            array = model.shm[ref[4:]]
        elif ref.startswith("const:"):
            array = model.arrays[ref[6:]]
        else:
            array = model.views[ref]
        if part:
            axis, start, stop = (int(x) for x in part.split(":"))
            if not (ref.startswith("slot:") and 0 <= axis < array.ndim
                    and 0 <= start < stop <= array.shape[axis]):
                raise ValueError(f"bad slice {part} of {ref} {array.shape}")
            index = [slice(None)] * array.ndim
            index[axis] = slice(start, stop)
            array = array[tuple(index)]
        return array

    def _compile(self, model: _Model, instr: dict[str, Any]) -> Callable[[], Any]:
        op = instr["op"]
        if op == "litert":
            wrapper, sub = model.interpreter._interpreter, model.subgraphs[instr["signature"]]
            return lambda: wrapper.Invoke(sub)
        if "srcs" in instr:
            return self._compile_numpy(model, instr)
        src, dst = self._ref(model, instr["src"]), self._ref(model, instr["dst"])
        if op == "copy":
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"copy {instr['src']} -> {instr['dst']}: {src.shape} vs {dst.shape}")
            return lambda: np.copyto(dst, src)
        compile_ = {"push": self._compile_push, "restore": self._compile_restore}.get(op)
        if compile_ is None:
            raise ValueError(f"unknown instruction {op!r}")
        if model.online is not None and model.online.enabled:
            return model.online.wrap(instr, src, dst, lambda s, d: compile_(model, instr, s, d))
        return compile_(model, instr, src, dst)

    def _compile_numpy(self, model: _Model, instr: dict[str, Any]) -> Callable[[], Any]:
        """One op the TA runs in numpy (``converters.plan._numpy_form``): exact as LiteRT's float kernels."""
        op = instr["op"]
        srcs = [self._ref(model, r) for r in instr["srcs"]]
        dsts = [self._ref(model, r) for r in instr["dsts"]]
        if any(a.dtype != np.float32 for a in (*srcs, *dsts)):
            raise ValueError(f"{op}: only float32 tensors")
        dst = dsts[0]
        if op == "binary":
            ufunc = BINARY_UFUNCS[instr["kind"]]
            a, b = srcs
            if np.broadcast_shapes(a.shape, b.shape) != dst.shape:
                raise ValueError(f"{instr['kind']}: {a.shape} and {b.shape} do not make {dst.shape}")
            return lambda: ufunc(a, b, out=dst)
        if op == "activation":
            (src,) = srcs
            if src.shape != dst.shape:
                raise ValueError(f"{instr['activation']}: {src.shape} -> {dst.shape}")
            return _activation_into(instr["activation"], instr["alpha"], src, dst)
        if op == "reshape":
            (src,) = srcs
            if src.size != dst.size:
                raise ValueError(f"reshape {src.shape} -> {dst.shape}")
            if not src.flags.c_contiguous:
                raise ValueError(f"reshape of a strided {src.shape}")
            flat = src.reshape(dst.shape)
            return lambda: np.copyto(dst, flat)
        if op == "concat":
            axis = instr["axis"]
            parts = []
            at = 0
            for src in srcs:
                index = [slice(None)] * dst.ndim
                index[axis] = slice(at, at + src.shape[axis])
                at += src.shape[axis]
                parts.append((dst[tuple(index)], src))
            if at != dst.shape[axis] or any(d.shape != s.shape for d, s in parts):
                raise ValueError(f"concat of {[s.shape for s in srcs]} into {dst.shape}")
            return lambda: [np.copyto(d, s) for d, s in parts]
        if op == "split":
            (src,) = srcs
            axis = instr["axis"]
            parts = []
            at = 0
            for d in dsts:
                index = [slice(None)] * src.ndim
                index[axis] = slice(at, at + d.shape[axis])
                at += d.shape[axis]
                parts.append((d, src[tuple(index)]))
            if at != src.shape[axis] or any(d.shape != s.shape for d, s in parts):
                raise ValueError(f"split of {src.shape} into {[d.shape for d in dsts]}")
            return lambda: [np.copyto(d, s) for d, s in parts]
        if op == "pad":
            (src,) = srcs
            pad, value = instr["pad"], np.float32(instr["value"])
            inner = tuple(slice(b, n - a) for (b, a), n in zip(pad, dst.shape, strict=True))
            if dst[inner].shape != src.shape:
                raise ValueError(f"pad {src.shape} by {pad} into {dst.shape}")

            def pad_() -> None:
                dst.fill(value)  # the slot is shared with other tensors: the border is rewritten
                np.copyto(dst[inner], src)
            return pad_
        if op == "upsample":
            (src,) = srcs
            fh, fw = instr["factor"]
            n, h, w, c = src.shape
            if dst.shape != (n, h * fh, w * fw, c):
                raise ValueError(f"upsample {src.shape} by {fh}x{fw} into {dst.shape}")
            if not dst.flags.c_contiguous:
                raise ValueError(f"upsample into a strided {dst.shape}")
            blocks = dst.reshape(n, h, fh, w, fw, c)
            spread = src[:, :, None, :, None, :]
            return lambda: np.copyto(blocks, spread)
        if op == "max_pool":
            return self._compile_max_pool(model, instr, srcs[0], dst)
        raise ValueError(f"unknown instruction {op!r}")

    def _compile_max_pool(self, model: _Model, instr: dict[str, Any], src: np.ndarray,
                          dst: np.ndarray) -> Callable[[], Any]:
        (fh, fw), (sh, sw) = instr["window"], instr["stride"]
        (top, bottom), (left, right) = instr["pad"]
        n, h, w, c = src.shape
        oh, ow = dst.shape[1:3]
        if dst.shape != (n, oh, ow, c) or min(fh, fw, sh, sw) < 1 or min(top, bottom, left, right) < 0:
            raise ValueError(f"max pool {src.shape} -> {dst.shape}")
        padded, fill = src, None
        if top or bottom or left or right:
            # Positions outside the input never win the max, as in LiteRT's kernel: pad with -inf.
            size = n * (h + top + bottom) * (w + left + right) * c
            padded = model.scratch[:size].reshape(n, h + top + bottom, w + left + right, c)
            fill = padded[:, top:top + h, left:left + w, :]
        windows = []
        for i in range(fh):
            for j in range(fw):
                view = padded[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
                if view.shape != dst.shape:
                    raise ValueError(f"max pool {src.shape} -> {dst.shape}: window out of range")
                windows.append(view)
        first, rest = windows[0], windows[1:]

        def max_pool() -> None:
            if fill is not None:
                padded.fill(-np.inf)
                np.copyto(fill, src)
            np.copyto(dst, first) if not rest else np.maximum(first, rest[0], out=dst)
            for view in rest[1:]:
                np.maximum(dst, view, out=dst)
        return max_pool

    def _compile_push(self, model: _Model, instr: dict[str, Any], src: np.ndarray,
                      dst: np.ndarray) -> Callable[[], Any]:
        mask = _push_mask(model.arrays, instr, dst)
        out, inner_mask, border = _masked_destination(dst, mask, instr["pad"])
        if src.shape != out.shape:
            raise ValueError(f"push {instr['src']} -> {instr['dst']}: {src.shape} into {out.shape}")
        perm = self._permutation(model, instr["permutation"], src.shape[-1])
        if instr.get("input_index"):
            return self._compile_mixing_push(model, instr, src, out, inner_mask, border)
        if perm is None:
            def push_plain() -> None:
                for d, s in border:
                    np.copyto(d, s)
                np.add(src, inner_mask, out=out)
            return push_plain
        # The permuted, still unmasked values only ever sit in secure scratch, a chunk at a time.
        work = model.scratch[:model.chunk]
        chunks = [(src[sl], _chunk_of(work, out[sl].shape), inner_mask[sl], out[sl])
                  for sl in _row_chunks(out.shape)]

        def push() -> None:
            for d, s in border:
                np.copyto(d, s)
            for s, w, m, o in chunks:
                np.take(s, perm, axis=-1, out=w, mode="wrap")
                np.add(w, m, out=o)
        return push

    def _mixer(self, model: _Model, instr: dict[str, Any],
               channels: int) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
        """``mix(x, out, tmp)``: ``out[:, c] = sum_j input_coef[j, c] * x[:, input_index[j, c]]`` for
        ``[rows, channels]`` chunks; one gather into ``tmp`` when a block's channels are scattered, then
        one small matmul per block (or, without block structure, the gather passes of a restore)."""
        index, coef = model.arrays[instr["input_index"]], model.arrays[instr["input_coef"]]
        if (index.ndim != 2 or index.shape != coef.shape or index.shape[1] != channels
                or coef.dtype != np.float32 or index.min(initial=0) < 0 or index.max(initial=0) >= channels
                or instr.get("permutation") is not None):
            raise ValueError(f"{instr['op']} {instr['src']}: inconsistent input mixing")
        plan = model.mixings.get(instr["input_index"])
        if plan is not None:
            order, blocks = plan
            order = None if order is None else order.astype(np.intp)

            def mix_blocks(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
                if order is not None:
                    np.take(x, order, axis=1, out=tmp, mode="clip")
                    x = tmp
                for rows, cols, matrix in blocks:
                    np.matmul(x[:, rows], matrix, out=out[:, cols])
            return mix_blocks
        (first, first_coef), *rest = [(i.astype(np.intp), c) for i, c in zip(index, coef, strict=True)]

        def mix_gather(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
            np.take(x, first, axis=1, out=out, mode="clip")
            np.multiply(out, first_coef, out=out)
            for i, c in rest:
                np.take(x, i, axis=1, out=tmp, mode="clip")
                np.multiply(tmp, c, out=tmp)
                np.add(out, tmp, out=out)
        return mix_gather

    def _compile_mixing_push(self, model: _Model, instr: dict[str, Any], src: np.ndarray, out: np.ndarray,
                             mask: np.ndarray, border: list[tuple[np.ndarray, np.ndarray]]
                             ) -> Callable[[], Any]:
        """A push whose input channels are mixed: chunk by chunk through secure scratch, then masked."""
        c = src.shape[-1]
        if not src.flags.c_contiguous:
            raise ValueError(f"push {instr['src']}: the source is not contiguous")
        mix = self._mixer(model, instr, c)
        work, term = model.scratch[:model.chunk], model.scratch[model.chunk:2 * model.chunk]
        chunks = []
        for sl in _row_chunks(out.shape):
            s = src[sl].reshape(-1, c)
            chunks.append((s, _chunk_of(work, s.shape), _chunk_of(term, s.shape), mask[sl], out[sl]))

        def push() -> None:
            for d, m in border:
                np.copyto(d, m)
            for s, w, t, m, o in chunks:
                mix(s, w, t)
                np.add(w.reshape(o.shape), m, out=o)
        return push

    def _compile_restore(self, model: _Model, instr: dict[str, Any], src: np.ndarray,
                         dst: np.ndarray) -> Callable[[], Any]:
        """``restore``, fused with the next round's push when it carries that push's ``mask`` field (a
        name, or None for an unmasked round): then ``dst`` is that round's shared input buffer and the
        restored values are permuted (``permutation``) or mixed, masked and padded (``pad``) on their way
        there, a chunk at a time through secure scratch. ``offset`` is in the output's channel order (a
        full tensor, or per channel when no static mask is popped), ``index`` / ``coef`` in the restored
        one."""
        index, coef, offset = (model.arrays[instr[k]] for k in ("index", "coef", "offset"))
        m, n = src.shape[-1], index.shape[1]
        fused = "mask" in instr
        out, mask, border = dst, None, []
        if fused:
            mask = _push_mask(model.arrays, instr, dst)
            out, mask, border = _masked_destination(dst, mask, instr.get("pad"))
        elif instr.get("pad") is not None:
            raise ValueError(f"restore {instr['src']}: padding without a push")
        per_channel = offset.shape == (n,) and out.shape != (n,)
        if (index.ndim != 2 or index.shape != coef.shape or out.shape[-1] != n
                or (offset.shape != out.shape and not per_channel)
                or src.shape[:-1] != out.shape[:-1]
                or index.min(initial=0) < 0 or index.max(initial=0) >= m or src.dtype != np.float32):
            raise ValueError(f"restore {instr['src']} -> {instr['dst']}: inconsistent shapes")
        perm = self._permutation(model, instr.get("permutation"), n)
        # Fused with a push that mixes the input channels: restored, activated, mixed, masked.
        mix = self._mixer(model, instr, n) if fused and instr.get("input_index") else None
        cap = model.chunk
        work, term, spare = (model.scratch[i * cap:(i + 1) * cap] for i in range(3))
        matrix = model.matrices.get(instr["offset"])  # permuted at load
        blocks = model.blocks.get(instr["offset"])
        terms = [(idx.astype(np.intp) if perm is None else idx[perm].astype(np.intp),
                  (None if np.all(c == 1) else c) if perm is None else
                  (None if np.all(c == 1) else np.ascontiguousarray(c[perm])))
                 for idx, c in zip(index, coef, strict=True)]
        kind, alpha = instr["activation"], instr["alpha"]
        # Never in place into a push's shared buffer: the values before mixing and masking stay secure.
        in_place = not fused and out.flags.c_contiguous
        chunks = []
        for sl in _row_chunks(out.shape):
            o = out[sl]
            w = o.reshape(-1, n) if in_place else _chunk_of(work, (o.size // n, n))
            t = _chunk_of(term, w.shape)
            v = _chunk_of(spare, w.shape)
            pushed = w if mix is None else v
            chunks.append((src[sl].reshape(-1, m), w, offset if per_channel else offset[sl].reshape(w.shape),
                           t, v,
                           _activation(kind, alpha, t),
                           # A strided destination (a slice of a concatenation) gets the chunk added to 0.
                           None if in_place else (pushed.reshape(o.shape),
                                                  np.float32(0) if mask is None else mask[sl], o)))

        if matrix is not None:
            def linear(s: np.ndarray, w: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
                np.matmul(s, matrix, out=w)
        elif blocks is not None:
            def linear(s: np.ndarray, w: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
                target = w if perm is None else v
                for rows, cols, part in blocks:
                    np.matmul(s[:, rows], part, out=target[:, cols])
                if perm is not None:
                    np.take(v, perm, axis=1, out=w, mode="wrap")
        else:
            (first, first_coef), rest = terms[0], terms[1:]

            def linear(s: np.ndarray, w: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
                np.take(s, first, axis=1, out=w, mode="wrap")
                if first_coef is not None:
                    np.multiply(w, first_coef, out=w)
                for idx, c in rest:
                    np.take(s, idx, axis=1, out=t, mode="wrap")
                    if c is not None:
                        np.multiply(t, c, out=t)
                    np.add(w, t, out=w)

        def restore() -> None:
            for d, s in border:
                np.copyto(d, s)
            for s, w, off, t, v, activation, masked in chunks:
                linear(s, w, t, v)
                np.add(w, off, out=w)
                if activation is not None:
                    activation(w)
                if mix is not None:
                    mix(w, v, t)
                if masked is not None:
                    np.add(masked[0], masked[1], out=masked[2])
        return restore

    def _permutation(self, model: _Model, name: str | None, channels: int) -> np.ndarray | None:
        if name is None:
            return None
        perm = model.arrays[name]
        if perm.shape != (channels,) or np.any(np.sort(perm) != np.arange(channels)):
            raise ValueError(f"{name}: not a permutation of {channels} channels")
        return perm.astype(np.intp)

    def _run_step(self, session: dict[str, Any], step: int) -> None:
        model = session.get("model")
        if model is None or model.steps is None:
            raise _error(TEE_ERROR_BAD_STATE, "no model loaded and bound to shared memory")
        if step >= len(model.steps) or (step != 0 and step != model.next_step):
            raise _error(TEE_ERROR_BAD_STATE, f"step {step} out of order (expected 0 or {model.next_step})")
        online = model.online
        last = step + 1 == len(model.steps)
        try:
            if step == 0 and online is not None:
                online.begin()  # this inference's one-time masks and projections
            for run in model.steps[step]:
                run()
        except BaseException:
            model.next_step = 0  # a failed step (e.g. a result that failed verification) ends the inference
            if online is not None:
                online.end()
            raise
        model.next_step = 0 if last else step + 1
        if last and online is not None:
            online.end()


def restore_blocks(index: np.ndarray, coef: np.ndarray,
                   m: int) -> list[tuple[slice, slice, np.ndarray]] | None:
    """The restore ``y[:, n] = sum_j coef[j, n] * y'[:, index[j, n]]`` as block matmuls
    ``y[:, cols] = y'[:, rows] @ matrix``, one per connected set of output and source channels, when
    each set is a contiguous range on both sides and the blocks pay (see ``BLOCK_*``); else None."""
    plan = block_matmuls(index, coef, m, gather=False)
    return None if plan is None else plan[1]


def block_matmuls(index: np.ndarray, coef: np.ndarray, m: int, gather: bool
                  ) -> tuple[np.ndarray | None, list[tuple[slice, slice, np.ndarray]]] | None:
    """``out[:, n] = sum_j coef[j, n] * src[:, index[j, n]]`` as ``(order, blocks)``: one matmul
    ``out[:, cols] = src'[:, rows] @ matrix`` per connected set of output and source channels, where
    ``src'`` is ``src`` itself (``order`` None: each set's source channels span a range, gaps as zero
    rows) or, with ``gather``, ``src[:, order]`` (one gather puts each set's source channels side by
    side). None when a set's output channels are not contiguous or the blocks do not pay (``BLOCK_*``)."""
    k, n = index.shape
    if n == 0 or index.min() < 0 or index.max() >= m:
        return None
    parent = np.arange(m)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for column in index.T.tolist():
        root = find(column[0])
        for row in column[1:]:
            other = find(row)
            if other != root:
                parent[other] = root
    label = np.array([find(int(r)) for r in index[0]])
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    if len(starts) != len(np.unique(label)) or n < BLOCK_MIN_MEAN_WIDTH * len(starts):
        return None  # a set of output channels is not contiguous, or the blocks are too narrow
    spans = list(zip(starts.tolist(), [*starts[1:].tolist(), n], strict=True))
    sources = [np.unique(index[:, a:b]) for a, b in spans]
    contiguous = all(len(r) == r[-1] - r[0] + 1 for r in sources)
    if not (contiguous or gather):
        sources = [np.arange(r[0], r[-1] + 1) for r in sources]
    order = np.concatenate(sources).astype(np.int32) if gather and not contiguous else None
    blocks, macs, at = [], 0, 0
    for (a, b), rows in zip(spans, sources, strict=True):
        macs += len(rows) * (b - a)
        matrix = np.zeros((len(rows), b - a), np.float32)
        for j in range(k):
            np.add.at(matrix, (np.searchsorted(rows, index[j, a:b]), np.arange(b - a)), coef[j, a:b])
        start = at if order is not None else int(rows[0])
        blocks.append((slice(start, start + len(rows)), slice(a, b), matrix))
        at += len(rows)
    if macs > BLOCK_MAX_MACS_PER_OUTPUT * n:
        return None
    return order, blocks


# Restores and pushes run a chunk of rows at a time (about this many float32 elements): whatever is still
# unmasked or half-restored sits in three small scratch buffers of secure memory, not full-size copies.
CHUNK = 1 << 16


def _row_chunks(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Index tuples cutting a ``[1, H, W, C]`` tensor into runs of whole rows of about ``CHUNK``
    elements; any other shape is one chunk."""
    if len(shape) == 4 and shape[0] == 1:
        rows = max(1, CHUNK // max(shape[2] * shape[3], 1))
        return [(slice(None), slice(h, min(h + rows, shape[1]))) for h in range(0, shape[1], rows)]
    return [()]


def _chunk_elements(shape: tuple[int, ...]) -> int:
    """Elements of the largest chunk of ``shape`` (see ``_row_chunks``)."""
    if len(shape) == 4 and shape[0] == 1:
        row = shape[2] * shape[3]
        return min(shape[1], max(1, CHUNK // max(row, 1))) * row
    return _elements(list(shape))


def _chunk_of(scratch: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    size = _elements(list(shape))
    if size > scratch.size:
        raise ValueError(f"a chunk of {shape} does not fit the scratch ({scratch.size} elements)")
    return scratch[:size].reshape(shape)


def _push_mask(arrays: dict[str, np.ndarray], instr: dict[str, Any], dst: np.ndarray) -> np.ndarray:
    """A push's mask: the program's array, or for an unmasked round (``mask`` None) zeros as a broadcast
    view, which costs no memory."""
    if instr["mask"] is None:
        return np.broadcast_to(np.float32(0), dst.shape)
    mask = arrays[instr["mask"]]
    if mask.shape != dst.shape or mask.dtype != np.float32:
        raise ValueError(f"push into {instr['dst']}: mask {mask.shape} for {dst.shape}")
    return mask


def _masked_destination(dst: np.ndarray, mask: np.ndarray, pad: Any) -> tuple[
        np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """For a push into ``dst`` (shared memory) of a tensor zero-padded by ``pad`` (or None): the interior
    that receives ``x + mask``, the mask's interior, and the border's (destination, mask) slices, where
    the value is ``0 + mask``."""
    if pad is None:
        return dst, mask, []
    if len(pad) != dst.ndim or any(len(p) != 2 or min(p) < 0 for p in pad):
        raise ValueError(f"bad padding {pad}")
    inner = tuple(slice(b, n - a) for (b, a), n in zip(pad, dst.shape, strict=True))
    border = []
    for axis, (before, after) in enumerate(pad):
        # Slabs along each padded axis, within the interior of the axes before it: disjoint, and with
        # the interior they cover the whole buffer.
        head = inner[:axis]
        for part in (slice(0, before), slice(dst.shape[axis] - after, dst.shape[axis])):
            if part.stop > part.start:
                index = (*head, part)
                border.append((dst[index], mask[index]))
    return dst[inner], mask[inner], border

def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, not {value!r}")
    return value


def _elements(shape: list[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _check_spec(spec: dict[str, Any], size: int, what: str) -> None:
    offset = _count(spec["offset"])
    dtype = np.dtype(spec["dtype"])
    if dtype != np.float32 or offset % 64 or offset + _elements(spec["shape"]) * 4 > size:
        raise ValueError(f"{what}: {json.dumps(spec)} does not fit {size} bytes")


def _view(arena: np.ndarray, spec: dict[str, Any], what: str) -> np.ndarray:
    _check_spec(spec, arena.nbytes, what)
    count = _elements(spec["shape"])
    return arena[spec["offset"]:spec["offset"] + 4 * count].view(np.float32).reshape(spec["shape"])
