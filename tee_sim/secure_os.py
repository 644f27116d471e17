"""The secure OS: loads trusted apps by UUID, runs their entry points, and gives them services.

Transports hand it parameters in wire form (``WireParam``: type, a, b, shared-memory id, offset,
size), already copied out of memory the normal world can change; it resolves memrefs to views of
registered shared memory, calls the TA, and answers with an ``Outcome`` (never an exception), so the
same code serves the in-process and the process transport.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from tee_sim import attestation, registry
from tee_sim.errors import (
    TEE_ERROR_ACCESS_CONFLICT,
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_GENERIC,
    TEE_ERROR_ITEM_NOT_FOUND,
    TEE_ERROR_SECURITY,
    TEE_ERROR_SHORT_BUFFER,
    TEE_ERROR_TARGET_DEAD,
    TEE_SUCCESS,
    TEEC_ORIGIN_TEE,
    TEEC_ORIGIN_TRUSTED_APP,
    TEEError,
)
from tee_sim.identity import DeviceKeys, resolve_home
from tee_sim.memory import Heap, SecureMemory
from tee_sim.params import (
    MAX_PARAMS,
    MEMREF_TYPES,
    NO_PARAM,
    TEEC_NONE,
    U64_MAX,
    VALUE_TYPES,
    TAParams,
    TEEParam,
    ta_param_type,
)
from tee_sim.sealing import SealingIdentity
from tee_sim.storage import ObjectStore, storage_not_available
from tee_sim.ta import TrustedApp

log = logging.getLogger("tee_sim.secure_os")

WireParam = tuple[int, int, int, int, int, int]  # wire type, a, b, shm id, offset, size
NO_PARAMS: tuple[WireParam, ...] = ((TEEC_NONE, 0, 0, 0, 0, 0),) * MAX_PARAMS
PROVISIONING_KEY_OBJECT = b"tee_sim.provisioning-x25519"
MAX_EPHEMERAL_KEYS = 16


_NO_OUTPUT = (0, 0, 0)
NO_OUTPUTS = [_NO_OUTPUT] * MAX_PARAMS
_ABSENT = (NO_PARAM,) * MAX_PARAMS


class Outcome:
    """The answer to one request; a plain class with slots because it is on the hot path."""

    __slots__ = ("code", "origin", "message", "outputs", "session", "ta_time_ns", "cause", "result", "memory")

    def __init__(
        self,
        code: int = TEE_SUCCESS,
        origin: int = TEEC_ORIGIN_TEE,
        message: str = "",
        outputs: list[tuple[int, int, int]] = NO_OUTPUTS,
        session: int = 0,
        ta_time_ns: int = 0,
        cause: BaseException | None = None,
    ) -> None:
        self.code, self.origin, self.message = code, origin, message
        self.outputs = outputs  # per parameter: a, b, size
        self.session, self.ta_time_ns = session, ta_time_ns
        self.cause = cause  # in-process only: the TA's exception, for a readable chain
        self.result: Any = None  # open_session's session context (stays in the secure world)
        self.memory = (0, 0, 0)  # secure memory used, peak, cap, filled in by the transport


class TEEServices:
    """What the secure OS offers a trusted app (``self.tee`` inside a ``TrustedApp``).

    Memory: ``alloc(shape, dtype)`` a zeroed numpy array counted against the device's cap,
    ``alloc_copy(array)``, ``free(array)``, ``reserve(nbytes)``/``unreserve(nbytes)`` for memory held
    in other forms, ``memory_stats()``. ``random_bytes(n)``: the CSPRNG. ``seal``/``unseal``: see
    ``tee_sim.sealing``. Persistent objects: ``create_object``, ``read_object``, ``write_object``,
    ``delete_object``, ``object_exists``. Attestation: ``attestation_report(nonce)`` on a fresh
    ephemeral key, ``provisioning_report(nonce)`` on the TA's persistent provisioning key, and
    ``open_provisioned(envelope, aad)`` to decrypt what a verifier encrypted to either.
    """

    def __init__(self, secure_os: SecureOS, ta_class: type[TrustedApp]) -> None:
        self._os = secure_os
        self._ta_class = ta_class
        self._heap = Heap(secure_os.memory)
        self._identity = SealingIdentity(ta_class.SIGNER, ta_class.UUID, ta_class.VERSION)
        self._ephemeral: OrderedDict[bytes, X25519PrivateKey] = OrderedDict()
        self._store: ObjectStore | None = None

    # Secure memory.
    def alloc(self, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        return self._heap.alloc(shape, dtype)

    def alloc_copy(self, source: Any, dtype: Any = None) -> np.ndarray:
        return self._heap.alloc_copy(source, dtype)

    def free(self, array: np.ndarray) -> None:
        self._heap.free(array)

    def reserve(self, nbytes: int, what: str | None = None) -> None:
        """Count memory the TA holds in other forms (an interpreter's arena, a decrypted program) against
        the cap; ``what``: what it is for, named in the error when it does not fit."""
        self._heap.reserve(nbytes, what)

    def unreserve(self, nbytes: int) -> None:
        self._heap.unreserve(nbytes)

    def memory_stats(self) -> dict[str, int]:
        """Device-wide ``used``/``peak``/``cap`` in bytes, plus ``ta_used`` by this TA."""
        return {**self._os.memory.stats(), "ta_used": self._heap.used}

    @staticmethod
    def random_bytes(n: int) -> bytes:
        return os.urandom(n)

    # Sealing and storage.
    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        from tee_sim.sealing import seal

        return seal(self._os.keys.root_key, self._identity, plaintext, aad)

    def unseal(self, blob: bytes, aad: bytes = b"") -> bytes:
        from tee_sim.sealing import unseal

        return unseal(self._os.keys.root_key, self._identity, blob, aad)

    @property
    def _objects(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self._os.home, self._os.keys.root_key, self._identity)
        return self._store

    def create_object(self, object_id: bytes | str, data: bytes, overwrite: bool = False) -> None:
        self._objects.create(object_id, data, overwrite)

    def read_object(self, object_id: bytes | str) -> bytes:
        return self._objects.read(object_id)

    def write_object(self, object_id: bytes | str, data: bytes) -> None:
        self._objects.write(object_id, data)

    def delete_object(self, object_id: bytes | str) -> None:
        self._objects.delete(object_id)

    def object_exists(self, object_id: bytes | str) -> bool:
        return self._objects.exists(object_id)

    # Attestation and provisioning.
    def attestation_report(self, nonce: bytes) -> attestation.Report:
        """A report on a fresh X25519 key held in secure memory (the last 16 stay usable)."""
        key = X25519PrivateKey.generate()
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._ephemeral[public] = key
        while len(self._ephemeral) > MAX_EPHEMERAL_KEYS:
            self._ephemeral.popitem(last=False)
        return self._sign(nonce, public, attestation.ONE_TIME_KEY)

    def provisioning_report(self, nonce: bytes) -> attestation.Report:
        """A report on this TA's persistent provisioning key (kept sealed in its storage)."""
        key = self._provisioning_key()
        return self._sign(nonce, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
                          attestation.PROVISIONING_KEY)

    def open_provisioned(self, envelope: bytes, aad: bytes = b"") -> bytes:
        """Decrypt an envelope sent to one of this TA's reports; ``TEE_ERROR_SECURITY`` otherwise."""
        recipient = attestation.envelope_recipient(envelope)
        key = self._ephemeral.get(recipient)
        if key is None:
            persistent = self._provisioning_key()
            if persistent.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) != recipient:
                # The envelope names its recipient in the clear: saying so tells nothing secret.
                raise TEEError(TEE_ERROR_SECURITY, TEEC_ORIGIN_TEE, "provisioned data is sealed to another "
                               "device's key (made for another device, or for this one before its keys "
                               "were reset)")
            key = persistent
        return attestation.open_envelope(key, envelope, aad)

    def _sign(self, nonce: bytes, public: bytes, key_use: str) -> attestation.Report:
        return attestation.sign_report(
            self._os.keys.attestation_key, self._os.measurement(self._ta_class), bytes(nonce), public, key_use
        )

    def _provisioning_key(self) -> X25519PrivateKey:
        try:
            return X25519PrivateKey.from_private_bytes(self._objects.read(PROVISIONING_KEY_OBJECT))
        except TEEError as exc:
            if exc.code != TEE_ERROR_ITEM_NOT_FOUND:
                raise
        raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        try:
            self._objects.create(PROVISIONING_KEY_OBJECT, raw)
        except TEEError as exc:  # another secure world created it first: use theirs
            if exc.code != TEE_ERROR_ACCESS_CONFLICT:
                raise
        return X25519PrivateKey.from_private_bytes(self._objects.read(PROVISIONING_KEY_OBJECT))

    def _release(self) -> None:
        self._heap.release_all()
        self._ephemeral.clear()


@dataclass
class _Instance:
    app: TrustedApp
    sessions: set[int] = field(default_factory=set)


@dataclass
class _Session:
    ta_uuid: uuid.UUID
    context: Any
    dead: bool = False


class SecureOS:
    """One device's secure world: TA instances, sessions, registered shared memory, the memory budget."""

    def __init__(self, home: str | os.PathLike[str] | None = None, memory_cap: int = 64 << 20) -> None:
        self.home: Path = resolve_home(home)
        self.memory = SecureMemory(memory_cap)
        self._keys: DeviceKeys | None = None
        self._instances: dict[uuid.UUID, _Instance] = {}
        self._sessions: dict[int, _Session] = {}
        self._next_session = 1
        self._shm: dict[int, memoryview] = {}
        self._measurements: dict[type, bytes] = {}

    @property
    def keys(self) -> DeviceKeys:
        if self._keys is None:
            try:
                self._keys = DeviceKeys.load_or_create(self.home)
            except OSError as exc:
                raise storage_not_available(self.home, exc) from exc
        return self._keys

    def measurement(self, ta_class: type[TrustedApp]) -> bytes:
        if ta_class not in self._measurements:
            self._measurements[ta_class] = ta_class.measurement()
        return self._measurements[ta_class]

    # Shared memory.
    def register_shm(self, shm_id: int, buffer: Any) -> None:
        self._shm[shm_id] = memoryview(buffer).cast("B")

    def release_shm(self, shm_id: int) -> None:
        view = self._shm.pop(shm_id, None)
        if view is not None:
            try:
                view.release()
            except BufferError:  # a TA kept a view past its call; the mapping lives until that is collected
                log.warning("shared memory %d released while a trusted app still holds a view of it", shm_id)

    def step_programs(self) -> dict[int, Any]:
        """By session id, the step programs that the open, live sessions' trusted apps offer
        (``TrustedApp.step_program``): what the process transport's fast path answers without them."""
        programs = {}
        for sid, session in self._sessions.items():
            instance = self._instances.get(session.ta_uuid)
            if session.dead or instance is None:
                continue
            try:
                program = instance.app.step_program(session.context)
            except Exception:  # noqa: BLE001 - a TA's bug costs it the fast path, not the secure OS
                log.error("step_program of session %d failed:\n%s", sid, traceback.format_exc())
                program = None
            if program is not None:
                programs[sid] = program
        return programs

    # Entry points, called by the transports.
    def open_session(self, ta_uuid: uuid.UUID, wire: tuple[WireParam, ...] = NO_PARAMS) -> Outcome:
        try:
            instance = self._instance(ta_uuid)
        except TEEError as exc:
            return Outcome(exc.code, exc.origin, exc.message)
        sid = self._next_session
        self._next_session += 1
        outcome = self._call(instance, wire, lambda params: instance.app.open_session(params))
        if outcome.code == TEE_SUCCESS:
            self._sessions[sid] = _Session(ta_uuid, outcome.result)
            outcome.result = None
            outcome.session = sid
            instance.sessions.add(sid)
        elif not instance.sessions and ta_uuid in self._instances:
            self._destroy(ta_uuid)
        return outcome

    def invoke(self, sid: int, cmd_id: int, wire: tuple[WireParam, ...]) -> Outcome:
        session = self._sessions.get(sid)
        if session is None:
            return Outcome(TEE_ERROR_BAD_STATE, TEEC_ORIGIN_TEE, f"no open session {sid}")
        if session.dead:
            return Outcome(TEE_ERROR_TARGET_DEAD, TEEC_ORIGIN_TEE, "the trusted app of this session panicked")
        instance = self._instances[session.ta_uuid]
        return self._call(
            instance, wire, lambda params: instance.app.invoke_command(session.context, cmd_id, params)
        )

    def close_session(self, sid: int) -> Outcome:
        session = self._sessions.pop(sid, None)
        if session is None:
            return Outcome(TEE_ERROR_BAD_STATE, TEEC_ORIGIN_TEE, f"no open session {sid}")
        if session.dead:
            return Outcome()
        instance = self._instances[session.ta_uuid]
        instance.sessions.discard(sid)
        outcome = self._call(instance, NO_PARAMS, lambda params: instance.app.close_session(session.context))
        if session.ta_uuid in self._instances and not instance.sessions:
            self._destroy(session.ta_uuid)
        return outcome

    def shutdown(self) -> None:
        """Close every session and destroy every TA (the normal world's context is finalized)."""
        for sid in list(self._sessions):
            self.close_session(sid)
        for ta_uuid in list(self._instances):
            self._destroy(ta_uuid)
        for shm_id in list(self._shm):
            self.release_shm(shm_id)

    def stats(self) -> dict[str, int]:
        return self.memory.stats()

    # Privileged services for the system pseudo-TA.
    def identity_report(self, ta_uuid: uuid.UUID, nonce: bytes) -> tuple[bytes, attestation.Report]:
        """The device's attestation public key and a report on ``ta_uuid``'s persistent provisioning key."""
        services = TEEServices(self, registry.load_ta_class(ta_uuid))
        return self.keys.attestation_public_key, services.provisioning_report(nonce)

    # Internals.
    def _instance(self, ta_uuid: uuid.UUID) -> _Instance:
        instance = self._instances.get(ta_uuid)
        if instance is not None:
            return instance
        ta_class = registry.load_ta_class(ta_uuid)
        app = ta_class()
        app.tee = TEEServices(self, ta_class)
        if getattr(ta_class, "PSEUDO", False):  # pseudo-TAs are part of the secure OS
            app.secure_os = self  # type: ignore[attr-defined]
        instance = _Instance(app)
        self._instances[ta_uuid] = instance
        try:
            app.create()
        except TEEError:
            self._instances.pop(ta_uuid)
            app.tee._release()
            raise
        except Exception as exc:  # noqa: BLE001 - a TA's bug must not take the secure OS down
            log.error("trusted app %s panicked in create():\n%s", ta_uuid, traceback.format_exc())
            self._instances.pop(ta_uuid)
            app.tee._release()
            raise TEEError(
                TEE_ERROR_TARGET_DEAD,
                TEEC_ORIGIN_TEE,
                f"trusted app panicked in create ({type(exc).__name__})",
            ) from exc
        return instance

    def _destroy(self, ta_uuid: uuid.UUID) -> None:
        instance = self._instances.pop(ta_uuid)
        try:
            instance.app.destroy()
        except Exception:  # noqa: BLE001
            log.error("trusted app %s failed in destroy():\n%s", ta_uuid, traceback.format_exc())
        instance.app.tee._release()

    def _panic(self, instance: _Instance) -> None:
        """A TA raised something other than TEEError: tear it down without its destroy entry point."""
        ta_uuid = next(u for u, i in self._instances.items() if i is instance)
        for sid in instance.sessions:
            self._sessions[sid].dead = True
        del self._instances[ta_uuid]
        instance.app.tee._release()

    def _params(self, wire: tuple[WireParam, ...]) -> TAParams:
        if wire is NO_PARAMS:
            return TAParams(_ABSENT, 0)
        params, types = [], 0
        for i, (wire_type, a, b, shm_id, offset, size) in enumerate(wire):
            if wire_type == TEEC_NONE:
                params.append(NO_PARAM)
                continue
            if wire_type in VALUE_TYPES:
                params.append(TEEParam(wire_type, a, b) if wire_type & 1 else TEEParam(wire_type))
            elif wire_type in MEMREF_TYPES:
                view = self._shm.get(shm_id)
                if view is None or offset < 0 or size < 0 or offset + size > view.nbytes:
                    raise TEEError(
                        TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TEE, "memref outside registered memory"
                    )
                window = view[offset : offset + size]
                buffer = window if wire_type & 2 else window.toreadonly()
                params.append(TEEParam(ta_param_type(wire_type), buffer=buffer))
            else:
                raise TEEError(
                    TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TEE, f"unknown parameter type {wire_type}"
                )
            types |= params[-1].type << (4 * i)
        return TAParams(params, types)

    def _call(self, instance: _Instance, wire: tuple[WireParam, ...], entry: Any) -> Outcome:
        """Run one entry point; its return value is ``Outcome.result`` (open_session's context)."""
        try:
            params = self._params(wire)
        except TEEError as exc:
            return Outcome(exc.code, exc.origin, exc.message)
        outcome = Outcome()
        start = time.perf_counter_ns()
        try:
            outcome.result = entry(params)
        except TEEError as exc:
            outcome = Outcome(exc.code, exc.origin, exc.message, cause=exc)
        except Exception as exc:  # noqa: BLE001 - a TA's bug must not take the secure OS down
            log.error("trusted app panicked:\n%s", traceback.format_exc())
            self._panic(instance)
            outcome = Outcome(
                TEE_ERROR_TARGET_DEAD,
                TEEC_ORIGIN_TEE,
                f"trusted app panicked ({type(exc).__name__}); see the secure world log",
                cause=exc,
            )
        outcome.ta_time_ns = time.perf_counter_ns() - start
        outcome.outputs = self._outputs(params, wire, outcome)
        return outcome

    @staticmethod
    def _outputs(
        params: TAParams, wire: tuple[WireParam, ...], outcome: Outcome
    ) -> list[tuple[int, int, int]]:
        if params.types & 0x2222 == 0:  # no output parameter
            return NO_OUTPUTS
        outputs = []
        for p, w in zip(params, wire, strict=True):
            wire_type = w[0]
            if wire_type & 2 == 0:  # none or input only: nothing comes back
                outputs.append(_NO_OUTPUT)
                continue
            try:
                a, b, size = int(p.a), int(p.b), int(p.size)
                if not (0 <= a <= U64_MAX and 0 <= b <= U64_MAX and 0 <= size <= U64_MAX):
                    raise ValueError
            except (TypeError, ValueError):
                if outcome.code == TEE_SUCCESS:
                    outcome.code, outcome.origin = TEE_ERROR_GENERIC, TEEC_ORIGIN_TRUSTED_APP
                    outcome.message = "trusted app wrote an invalid output parameter"
                a = b = size = 0
            if outcome.code == TEE_SUCCESS and wire_type in MEMREF_TYPES and size > w[5]:
                outcome.code, outcome.origin = TEE_ERROR_SHORT_BUFFER, TEEC_ORIGIN_TRUSTED_APP
                outcome.message = f"trusted app reported {size} bytes in a buffer of {w[5]}"
            outputs.append((a, b, size))
        return outputs
