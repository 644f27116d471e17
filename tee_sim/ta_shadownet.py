"""The ShadowNet trusted app: runs the secret part of a protected model inside the secure world.

LOAD_MODEL opens ``secrets.sealed`` (sealed for this device, or provisioned to it), checks that the
paired ``untrusted.tflite`` has the SHA-256 the vendor sealed, parses the TEE program
(``tee_sim.program``, never pickle) and allocates every buffer once against the secure-memory cap.
BIND_SHARED_MEMORY resolves the shared buffer layout to zero-copy views and compiles every step
(``tee_sim.ta_shadownet_compile``). RUN_STEP k then executes step k's instructions, prebuilt as closures
over preallocated arrays, so an inference allocates nothing:

- ``restore`` and ``push``: the crossings between the accelerator and the TEE - unmask and undo the
  obfuscation of an accelerator output, then obfuscate and mask the next round's input into shared
  memory (``tee_sim.ta_shadownet_restore_push``, which also says why these kernels; the restore's
  linear maps are prepared at load, ``tee_sim.ta_shadownet_linears``);
- ``copy``: between secure slots, LiteRT's tensors and the shared input/output buffers;
- numpy ops (``binary``, ``activation``, ``reshape``, ``concat``, ``split``, ``pad``, ``upsample``):
  the TEE's own ops that the TA runs itself on its arena, exact as LiteRT's
  (``tee_sim.ta_shadownet_numpy_ops``); ``max_pool`` and ``depthwise`` likewise, one call of a C kernel
  each (``tee_sim.ta_shadownet_max_pool``, ``tee_sim.ta_shadownet_depthwise``);
- ``litert``: one signature of the TEE-side ``.tflite`` that holds the step's other ops (LiteRT gives
  their exact semantics: RESIZE_BILINEAR, MEAN, SOFTMAX, ...), invoked in place on
  tensors whose buffers the restores and copies write directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tee_sim.errors import (
    TEE_ERROR_BAD_FORMAT,
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_NOT_SUPPORTED,
    TEE_ERROR_SECURITY,
    TEEError,
)
from tee_sim.memory import SharedScratch
from tee_sim.obfuscated_weights import check_untrusted
from tee_sim.params import (
    TEE_PARAM_TYPE_MEMREF_INOUT,
    TEE_PARAM_TYPE_MEMREF_INPUT,
    TEE_PARAM_TYPE_MEMREF_OUTPUT,
    TEE_PARAM_TYPE_VALUE_INPUT,
    TEE_PARAM_TYPE_VALUE_OUTPUT,
    TEE_PARAM_TYPES,
    TAParams,
    TEEParam,
    check_param_types,
)
from tee_sim.per_inference import PerInference
from tee_sim.program import PROGRAM_FORMAT, ProgramFormatError, read_program
from tee_sim.secure_world_fast import StepProgram
from tee_sim.ta import TrustedApp, ta_error, write_output
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
from tee_sim.ta_shadownet_compile import (
    check_spec,
    checked_placement,
    compile_instruction,
    count,
    prepare_depthwise,
    shape_of,
    view,
)
from tee_sim.ta_shadownet_kernels import SOURCES as KERNEL_SOURCES
from tee_sim.ta_shadownet_linears import Linear, prepare_linears
from tee_sim.ta_shadownet_restore_push import scratch_size
from tee_sim.ta_shadownet_steps import ahead, run_step, settle, step_program, take_ahead

MEMREF_IN, MEMREF_OUT = TEE_PARAM_TYPE_MEMREF_INPUT, TEE_PARAM_TYPE_MEMREF_OUTPUT
MEMREF_INOUT = TEE_PARAM_TYPE_MEMREF_INOUT
VALUE_IN, VALUE_OUT = TEE_PARAM_TYPE_VALUE_INPUT, TEE_PARAM_TYPE_VALUE_OUTPUT
_LOAD_WITH_OPTIONS = MEMREF_IN | MEMREF_IN << 4 | VALUE_IN << 8  # LOAD_MODEL with its options value
_LOAD_WITH_MANIFEST = _LOAD_WITH_OPTIONS | MEMREF_IN << 12  # ... and the manifest's digest


def _bad_format(message: str) -> TEEError:
    # An authenticated program this TA cannot use was made by a converter of another version.
    return ta_error(TEE_ERROR_BAD_FORMAT, f"TEE program not understood by this trusted app ({message}): "
                                        "re-convert the model with this version of shadownet")


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
    stride: int = 0  # floats per pixel in the restore / push kernel's four tiles in scratch
    tile: int = 0  # pixels per tile
    restores: dict[str, Linear] = field(default_factory=dict)  # restore (by offset array) -> its form
    mixings: dict[str, Linear] = field(default_factory=dict)  # input mixing (by index array) -> its form
    depthwise: dict[str, np.ndarray] = field(default_factory=dict)  # depthwise weights, packed (shared)
    steps: list[list[Callable[[], Any]]] | None = None
    shm: dict[str, np.ndarray] = field(default_factory=dict)
    # The step expected next: a cell the secure world's fast path reads and advances too (step_program);
    # then the step it handed back to Python, the place in it of the call that failed (-1: none) and what
    # that call returned.
    cursor: np.ndarray = field(default_factory=lambda: np.array([0, -1, -1, 0], np.int32))
    fast: dict[int, StepProgram] | None = None  # step_program's, for these steps, by pool slot
    online: PerInference | None = None  # one-time masks and integrity checks (tee_sim.per_inference)
    shared: bytes | None = None  # key of the program it shares with other sessions (ShadowNetTA._programs)
    scratches: list[Any] = field(default_factory=list)  # its handles of the TA's SharedScratch


@dataclass
class _SharedProgram:
    """A decrypted program, held once for every session that loaded the same ``secrets.sealed``."""

    program: dict[str, Any]
    arrays: dict[str, np.ndarray]
    nbytes: int
    users: int = 0
    depthwise: dict[str, np.ndarray] = field(default_factory=dict)  # depthwise weights, packed once


class ShadowNetTA(TrustedApp):
    """The trusted app of protected inference (commands: ``tee_sim.ta_shadownet_commands``)."""

    UUID = UUID
    VERSION = 1
    SIGNER = "shadownet"
    CODE_MODULES = ("tee_sim.program", "tee_sim.per_inference", "tee_sim.per_inference_kernels",
                    "tee_sim.mask_spread", "tee_sim.exact_split", "tee_sim.modular_masks",
                    "tee_sim.obfuscated_weights", "tee_sim.one_time_masks", "tee_sim.freivalds",
                    "tee_sim.freivalds_bound", "tee_sim.freivalds_directions", "tee_sim.layer_geometry",
                    "tee_sim.ta_shadownet_commands", "tee_sim.ta_shadownet_numpy_ops",
                    "tee_sim.ta_shadownet_linears", "tee_sim.ta_shadownet_restore_push",
                    "tee_sim.ta_shadownet_max_pool", "tee_sim.ta_shadownet_depthwise",
                    "tee_sim.ta_shadownet_small_ops",
                    "tee_sim.ta_shadownet_steps", "tee_sim.ta_shadownet_compile",
                    "tee_sim.ta_shadownet_kernels")
    CODE_FILES = KERNEL_SOURCES

    def create(self) -> None:
        # Sessions that load the same secrets (e.g. two frames in flight) share the read-only program:
        # a second copy of the masks and offsets would double the secure memory for nothing.
        self._programs: dict[bytes, _SharedProgram] = {}
        # ... and the buffers that live within one call (tee_sim.memory.SharedScratch)
        self._scratch = SharedScratch(self.tee.alloc, self.tee.free)

    def open_session(self, params: TAParams) -> dict[str, Any]:
        check_param_types(params)
        return {"model": None}

    def close_session(self, session: dict[str, Any]) -> None:
        try:
            settle(session.get("model"))
        except TEEError:  # a check failed on the fast path: the session ends all the same, nothing of it used
            pass
        self._unload(session)

    def invoke_command(self, session: dict[str, Any], cmd_id: int, params: TAParams) -> None:
        settle(session.get("model"))
        if cmd_id == Command.RUN_STEP:  # the hot path first
            check_param_types(params, VALUE_IN)
            self._run_step(session, params[0].a)
            return
        try:
            self._command(session, cmd_id, params)
        finally:
            take_ahead(session.get("model"))  # between inferences: the next one's pool entry

    def _command(self, session: dict[str, Any], cmd_id: int, params: TAParams) -> None:
        if cmd_id == Command.LOAD_MODEL:
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
                raise ta_error(TEE_ERROR_BAD_STATE, "no model loaded with its weights outside")
            model.online.weights.bind(np.frombuffer(params[0].buffer, np.uint8))
        elif cmd_id == Command.GET_POOL_STATS:
            check_param_types(params, MEMREF_OUT)
            model = session.get("model")
            stats = model.online.stats(ahead(model)) if model is not None and model.online is not None \
                else PerInference.idle_stats()
            write_output(params[0], json.dumps(stats).encode())
        elif cmd_id == Command.BIND_SHARED_MEMORY:
            if params.types == TEE_PARAM_TYPES(MEMREF_INOUT, MEMREF_IN):
                self._bind(session, params[0], bytes(params[1].buffer))
            else:
                check_param_types(params, MEMREF_INOUT)
                self._bind(session, params[0], None)
        elif cmd_id == Command.GET_STATS:
            check_param_types(params, VALUE_OUT)
            stats = self.tee.memory_stats()
            params[0].a, params[0].b = stats["ta_used"], stats["peak"]
        elif cmd_id == Command.GET_REPORT:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            write_output(params[1], self.tee.attestation_report(bytes(params[0].buffer)).to_bytes())
        elif cmd_id == Command.PROVISION:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            self._provision(params[0].buffer, params[1])
        else:
            raise ta_error(TEE_ERROR_NOT_SUPPORTED, f"unknown command {cmd_id}")

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
        write_output(out, sealed)

    def _open_secrets(self, blob: memoryview) -> bytes:
        head = bytes(blob[:len(SECRETS_MAGIC) + 1])
        if len(head) != len(SECRETS_MAGIC) + 1 or head[:-1] != SECRETS_MAGIC:
            raise ta_error(TEE_ERROR_SECURITY, "secrets failed authentication")
        payload = bytes(blob[len(head):])
        if head[-1:] == SEALED:
            try:
                return self.tee.unseal(payload, SECRETS_AAD)
            except TEEError as exc:  # sealing's one opaque error, and what it means for a user here
                if exc.code != TEE_ERROR_SECURITY:  # not the blob: the device's key could not be read
                    raise
                raise ta_error(exc.code, f"{exc.message}: secrets.sealed was changed, or sealed by another "
                                         "device (each device seals with its own key)") from None
        if head[-1:] == PROVISIONED:
            return self.tee.open_provisioned(payload, SECRETS_AAD)
        raise ta_error(TEE_ERROR_SECURITY, "secrets failed authentication")

    def _load(self, session: dict[str, Any], blob: memoryview, untrusted: memoryview, flags: int = 0,
              capacity: int = 0, manifest: bytes | None = None) -> None:
        self._unload(session)
        # The normal world's buffer is read once: hashed and opened from the same copy (read twice, the
        # bytes opened could be other than the bytes whose hash files the program).
        sealed = bytes(blob)
        key = hashlib.sha256(sealed).digest()  # the very bytes another session loaded: authentic too
        shared = self._programs.get(key)
        if shared is None:
            shared = self._open_program(memoryview(sealed))
        del sealed  # the simulator's copy (a real TEE hashes and decrypts the ciphertext block by block)
        try:  # early, on every load; what the TA uses of the file is hashed again as it reads it (Weights)
            check_untrusted(hashlib.sha256(untrusted).hexdigest(), shared.program.get("untrusted_sha256"))
        except TEEError:
            if not shared.users:
                self.tee.unreserve(shared.nbytes)
            raise
        sealed_manifest = shared.program.get("manifest_sha256")
        if manifest is not None and sealed_manifest is not None and manifest.hex() != sealed_manifest:
            if not shared.users:
                self.tee.unreserve(shared.nbytes)
            raise ta_error(TEE_ERROR_SECURITY, "manifest.json is not the one converted with these secrets "
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
        # The plaintext (about the blob's size) lands in secure memory; the ciphertext is the simulator's
        # copy of the normal world's buffer (_load: not counted, as a real TEE reads it block by block).
        self.tee.reserve(blob.nbytes, "the model's TEE program, decrypted")
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
        self.tee.reserve(len(plaintext), "the model's TEE program, decrypted")
        return _SharedProgram(program, arrays, len(plaintext))

    def _per_inference(self, model: _Model, untrusted: memoryview, flags: int, capacity: int) -> None:
        """One-time masks and integrity checks: their live buffers join the program's arrays under the
        names the instructions use, so pushes and restores compile as usual (``tee_sim.per_inference``)."""
        p = model.program
        known = LOAD_VERIFY | LOAD_FAIL_WHEN_EMPTY | LOAD_WEIGHTS_OUTSIDE
        if flags & ~known or capacity > MAX_POOL_CAPACITY:
            raise ta_error(TEE_ERROR_BAD_PARAMETERS, f"load options 0x{flags:x} / pool of {capacity}")
        if not (p.get("one_time") or {}).get("masks") and not flags & LOAD_VERIFY:
            return
        try:
            shapes = {name: tuple(spec["shape"]) for name, spec in p["shared_buffers"].items()}
            online = PerInference(p, model.arrays, shapes, untrusted, lambda s, d: self._alloc(model, s, d),
                                  self.tee.random_bytes, verify=bool(flags & LOAD_VERIFY), capacity=capacity,
                                  fail_when_empty=bool(flags & LOAD_FAIL_WHEN_EMPTY),
                                  weights_outside=bool(flags & LOAD_WEIGHTS_OUTSIDE),
                                  scratch=lambda what, s, d: self._share(model, what, s, d))
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
            raise ta_error(TEE_ERROR_BAD_STATE, "no model loaded")
        online = model.online
        if online is None or not online.enabled:
            out.a, out.b = 0, 0
            return
        budget = request.a / 1e6 if request.a else None
        online.refill(budget, request.b)
        take_ahead(model)
        out.a, out.b = online.ready + ahead(model), online.capacity

    def _unload(self, session: dict[str, Any]) -> None:
        model = session.get("model")
        session["model"] = None
        if model is not None:
            self._free(model)

    def _free(self, model: _Model) -> None:
        model.steps = None
        model.fast = None  # it holds the steps too (and through them views of the shared memory)
        model.online = None
        model.views.clear()
        model.shm.clear()
        model.interpreter = None
        model.restores.clear()
        model.mixings.clear()
        model.depthwise.clear()
        for array in model.held:
            self.tee.free(array)
        model.held.clear()
        for handle in model.scratches:
            self._scratch.release(handle)
        model.scratches.clear()
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

    def _share(self, model: _Model, purpose: str, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        """Secure memory for ``purpose`` that ``model`` uses within one call only, shared with the other
        sessions' (``tee_sim.memory.SharedScratch``)."""
        array, handle = self._scratch.take(purpose, shape, dtype)
        model.scratches.append(handle)
        return array

    def _build(self, model: _Model) -> None:
        """Allocate the secure arena and LiteRT's tensors, resolve every name the program uses."""
        p = model.program
        try:
            arena_size = count(p["arena_size"])
            arena = self._alloc(model, arena_size, np.uint8)
            for name, spec in p["slots"].items():
                model.views[f"slot:{name}"] = view(arena, spec, f"slot {name!r}")
            for name, spec in p["shared_buffers"].items():
                check_spec(spec, count(p["shared_memory_size"]), f"shared buffer {name!r}")
            if p["tee_model"] is not None:
                self._build_litert(model, p)
            model.stride, model.tile, scratch = scratch_size(p["steps"], model.arrays,
                                                             lambda ref: shape_of(model, ref))
            model.scratch = self._share(model, "the kernels' tiles", scratch, np.float32)
            prepare_linears(model, p["steps"], p["shared_buffers"], lambda s, d: self._alloc(model, s, d))
            shared = self._programs[model.shared]

            def reserve(nbytes: int) -> None:  # held with the program: freed with it
                self.tee.reserve(nbytes, "the model's TEE program, its depthwise weights packed")
                shared.nbytes += nbytes

            prepare_depthwise(model, p["steps"], shared.depthwise, reserve)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _bad_format(f"{type(exc).__name__}: {exc}") from None

    def _build_litert(self, model: _Model, p: dict[str, Any]) -> None:
        from ai_edge_litert.interpreter import Interpreter

        tflite = bytes(model.arrays[p["tee_model"]])
        # LiteRT's arenas live in secure memory too; the converter computed their size (an upper bound).
        self.tee.reserve(count(p["tee_model_arena_bytes"]),
                         f"the arenas of the TEE's LiteRT interpreter, which runs the ops of the model the "
                         f"trusted app has no kernel of its own for ({len(p['signatures'])} units, each "
                         "arena its own)")
        model.reserved += count(p["tee_model_arena_bytes"])
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

    # Shared memory and steps.
    def _bind(self, session: dict[str, Any], param: TEEParam, placement: bytes | None) -> None:
        model = session.get("model")
        if model is None:
            raise ta_error(TEE_ERROR_BAD_STATE, "no model loaded")
        p = model.program
        offsets = {name: spec["offset"] for name, spec in p["shared_buffers"].items()}
        if placement is not None:
            offsets = checked_placement(placement, p, param.buffer.nbytes)
        elif param.buffer.nbytes < p["shared_memory_size"]:
            raise ta_error(TEE_ERROR_BAD_PARAMETERS,
                         f"shared memory of {param.buffer.nbytes} bytes, the layout needs "
                         f"{p['shared_memory_size']}")
        model.steps = model.fast = None
        try:
            rounds = {name.split("/")[0] for name in p["shared_buffers"] if name.startswith("round_")}
            if len(p["steps"]) != len(rounds) + 1:
                raise ValueError(f"{len(p['steps'])} steps for {len(rounds)} rounds")
            # Kept past this call, as the ShadowNet contract says: the runtime keeps the memory registered
            # for the session's lifetime and the TA drops these views when the session closes.
            model.shm = {name: param.ndarray(spec["dtype"], tuple(spec["shape"]), offsets[name])
                         for name, spec in p["shared_buffers"].items()}
            model.steps = [[compile_instruction(model, instr) for instr in step] for step in p["steps"]]
        except TEEError:
            model.shm = {}
            raise
        except Exception as exc:  # noqa: BLE001 - an authenticated program that does not fit together
            model.shm = {}
            raise _bad_format(f"{type(exc).__name__}: {exc}") from None
        model.cursor[0] = 0

    def step_program(self, session: dict[str, Any]) -> StepProgram | None:
        """RUN_STEP for the secure world's fast path (``tee_sim.ta_shadownet_steps.step_program``)."""
        return step_program(session.get("model"), int(Command.RUN_STEP))

    def _run_step(self, session: dict[str, Any], step: int) -> None:
        run_step(session.get("model"), step)

