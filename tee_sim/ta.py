"""The trusted-app base class: GlobalPlatform's five entry points, identity attributes, OS services.

A trusted app subclasses ``TrustedApp``, sets ``UUID``, ``VERSION`` and ``SIGNER``, is listed by UUID in
``tee_sim.registry.trusted_apps()`` and is instantiated inside the secure world on the first OpenSession.
One instance serves all sessions to its UUID (``create`` once, ``destroy`` when the last session
closes). Every handler checks its parameter types first::

    def invoke_command(self, session, cmd_id, params):
        if cmd_id == Cmd.SCALE:
            check_param_types(params, TEE_PARAM_TYPE_VALUE_INPUT, TEE_PARAM_TYPE_MEMREF_INOUT)
            x = params[1].ndarray(np.float32)       # zero-copy view of the normal world's shared memory
            x *= params[0].a
        ...

``self.tee`` (a ``tee_sim.secure_os.TEEServices``) gives the secure OS's services: secure-memory
``alloc``/``free``, ``random_bytes``, ``seal``/``unseal``, persistent objects, attestation reports
and opening secrets provisioned to them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import uuid
from typing import TYPE_CHECKING, Any, ClassVar

from tee_sim.attestation import measure
from tee_sim.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_NOT_SUPPORTED,
    TEE_ERROR_SHORT_BUFFER,
    TEEC_ORIGIN_TRUSTED_APP,
    TEEError,
)
from tee_sim.params import TAParams, TEEParam, check_param_types

if TYPE_CHECKING:
    from tee_sim.secure_os import TEEServices


class TrustedApp:
    """Base of every trusted app; override the entry points you need."""

    UUID: ClassVar[uuid.UUID]
    VERSION: ClassVar[int] = 1  # security version: sealing binds to (SIGNER, UUID, VERSION), see sealing.py
    SIGNER: ClassVar[str] = "tee_sim"
    # Other modules whose code the TA runs; their source is part of the measurement too.
    CODE_MODULES: ClassVar[tuple[str, ...]] = ()
    # Native code it runs, by source file (measured as source, like the modules: the same on every
    # device that built it, as a vendor's signed binary would be).
    CODE_FILES: ClassVar[tuple[os.PathLike[str] | str, ...]] = ()

    tee: TEEServices  # set by the secure OS before create()

    @classmethod
    def code_identity(cls) -> bytes:
        """What the measurement hashes as "the code": the source of the module that defines the TA,
        then that of each module in ``CODE_MODULES`` and each file in ``CODE_FILES``, each behind its
        name and length."""
        path = inspect.getsourcefile(cls)
        if path is None:
            return f"{cls.__module__}:{cls.__qualname__}".encode()
        with open(path, "rb") as f:
            identity = f.read()
        for name in cls.CODE_MODULES:
            module_path = inspect.getsourcefile(importlib.import_module(name))
            if module_path is None:
                raise RuntimeError(f"no source for {name}, which {cls.__qualname__} measures")
            with open(module_path, "rb") as f:
                source = f.read()
            identity += f"\0{name}\0{len(source)}\0".encode() + source
        for path in cls.CODE_FILES:
            with open(path, "rb") as f:
                source = f.read()
            identity += f"\0{os.path.basename(path)}\0{len(source)}\0".encode() + source
        return identity

    @classmethod
    def measurement(cls) -> bytes:
        """SHA-256 over the TA's UUID, signer, security version and code identity (32 bytes)."""
        return measure(cls.UUID, cls.SIGNER, cls.VERSION, cls.code_identity())

    # The five entry points (TA_CreateEntryPoint, ...).
    def create(self) -> None:
        """Called once, before the first session opens."""

    def destroy(self) -> None:
        """Called once, after the last session closed (or when the secure world shuts down)."""

    def open_session(self, params: TAParams) -> Any:
        """Return the per-session context passed back to ``invoke_command`` and ``close_session``."""
        check_param_types(params)
        return None

    def close_session(self, session: Any) -> None:
        """Release what ``open_session`` set up."""

    def invoke_command(self, session: Any, cmd_id: int, params: TAParams) -> None:
        """Run command ``cmd_id``; write outputs into ``params``; raise ``TEEError`` to fail."""
        raise TEEError(TEE_ERROR_NOT_SUPPORTED, TEEC_ORIGIN_TRUSTED_APP, f"unknown command {cmd_id}")

    def step_program(self, session: Any) -> Any:
        """Optional: the session's ``tee_sim.secure_world_fast.StepProgram`` (a step command and the steps
        of it that are C calls only), which the process transport's secure world then answers without
        calling ``invoke_command``; None (the default): every command comes here. Asked after every request
        this app handles: return the same object while nothing changed."""
        return None


def ta_error(code: int, message: str) -> TEEError:
    """An error a trusted app answers with (origin ``TEEC_ORIGIN_TRUSTED_APP``)."""
    return TEEError(code, TEEC_ORIGIN_TRUSTED_APP, message)


def bad_parameters(message: str) -> TEEError:
    """The error a handler raises for malformed input from the normal world."""
    return ta_error(TEE_ERROR_BAD_PARAMETERS, message)


def write_output(param: TEEParam, data: bytes) -> None:
    """``data`` into an output memref, its size set to the bytes written; ``TEE_ERROR_SHORT_BUFFER`` with
    the size set to what is needed when the buffer is smaller (GlobalPlatform's convention)."""
    if len(data) > param.buffer.nbytes:
        param.size = len(data)
        raise ta_error(TEE_ERROR_SHORT_BUFFER, f"need {len(data)} bytes")
    param.buffer[:len(data)] = data
    param.size = len(data)
