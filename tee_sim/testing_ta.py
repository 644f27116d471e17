"""A small trusted app for tests and benchmarks: echo, add, allocate, sleep, panic, seal, attest."""

from __future__ import annotations

import enum
import hashlib
import os
import time
from typing import Any

from tee_sim.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_NOT_SUPPORTED,
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
    check_param_types,
)
from tee_sim.registry import OTHER_TEST_TA_UUID, TEST_TA_UUID
from tee_sim.ta import TrustedApp, write_output

MEMREF_IN, MEMREF_OUT, MEMREF_INOUT = (
    TEE_PARAM_TYPE_MEMREF_INPUT,
    TEE_PARAM_TYPE_MEMREF_OUTPUT,
    TEE_PARAM_TYPE_MEMREF_INOUT,
)
VALUE_IN, VALUE_OUT = TEE_PARAM_TYPE_VALUE_INPUT, TEE_PARAM_TYPE_VALUE_OUTPUT


class Cmd(enum.IntEnum):
    NOTHING = 0  # no parameters: the empty round trip
    ECHO = 1  # memref in -> memref out (copy)
    ADD = 2  # value in (a, b) -> value out (a + b)
    ALLOC = 3  # value in (nbytes, keep) -> value out (used, peak)
    FREE_ALL = 4  # frees what ALLOC kept in this session
    SCALE = 5  # value in (factor) , memref inout float32: x *= factor in place
    SLEEP = 6  # value in (milliseconds, 0 = forever)
    PANIC = 7  # raises a Python exception: the TA panics
    SEAL = 8  # memref in plaintext -> memref out blob
    UNSEAL = 9  # memref in blob -> memref out plaintext
    REPORT = 10  # memref in nonce -> memref out report (JSON) on a fresh key
    PROVISION = 11  # memref in envelope, memref in aad -> memref out SHA-256 of the secret, kept sealed
    SECRET_HASH = 12  # -> memref out SHA-256 of the provisioned secret
    OBJECT_WRITE = 13  # memref in id, memref in data: create or replace
    OBJECT_READ = 14  # memref in id -> memref out data
    OBJECT_DELETE = 15  # memref in id
    FILL = 16  # value in (byte), memref out: fill the whole buffer
    MARK_ON_CLOSE = 17  # when this session closes, write the persistent object "closed-marker"
    COPY = 18  # memref in -> memref out of the same size: one memcpy inside the TA
    SPIN = 19  # value in (milliseconds): compute for that long (a slow command, not a hung one)


class TestTA(TrustedApp):
    UUID = TEST_TA_UUID
    # Tests of the sealing policy start a secure world whose test TA has another security version.
    VERSION = int(os.environ.get("TEE_SIM_TEST_TA_VERSION", "1"))
    SIGNER = "tee_sim tests"

    def open_session(self, params: TAParams) -> Any:
        check_param_types(params)
        return {"kept": []}

    def close_session(self, session: Any) -> None:
        for array in session["kept"]:
            self.tee.free(array)
        if session.get("mark"):
            self.tee.create_object(b"closed-marker", b"closed", overwrite=True)

    def invoke_command(self, session: Any, cmd_id: int, params: TAParams) -> None:
        if cmd_id == Cmd.NOTHING:
            check_param_types(params)
        elif cmd_id == Cmd.ECHO:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            write_output(params[1], bytes(params[0].buffer))
        elif cmd_id == Cmd.ADD:
            check_param_types(params, VALUE_IN, VALUE_OUT)
            params[1].a = params[0].a + params[0].b
        elif cmd_id == Cmd.ALLOC:
            check_param_types(params, VALUE_IN, VALUE_OUT)
            array = self.tee.alloc(params[0].a, "uint8")
            if params[0].b:
                session["kept"].append(array)
            stats = self.tee.memory_stats()
            params[1].a, params[1].b = stats["used"], stats["peak"]
            del array
        elif cmd_id == Cmd.FREE_ALL:
            check_param_types(params)
            while session["kept"]:
                self.tee.free(session["kept"].pop())
        elif cmd_id == Cmd.SCALE:
            check_param_types(params, VALUE_IN, MEMREF_INOUT)
            x = params[1].ndarray("float32")
            x *= params[0].a
        elif cmd_id == Cmd.SLEEP:
            check_param_types(params, VALUE_IN)
            while params[0].a == 0:
                time.sleep(3600)
            time.sleep(params[0].a / 1000)
        elif cmd_id == Cmd.SPIN:
            check_param_types(params, VALUE_IN)
            end = time.process_time() + params[0].a / 1000  # CPU time: as long on a starved core
            while time.process_time() < end:
                pass
        elif cmd_id == Cmd.PANIC:
            check_param_types(params)
            raise RuntimeError("test panic")
        elif cmd_id == Cmd.SEAL:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            write_output(params[1], self.tee.seal(bytes(params[0].buffer)))
        elif cmd_id == Cmd.UNSEAL:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            write_output(params[1], self.tee.unseal(bytes(params[0].buffer)))
        elif cmd_id == Cmd.REPORT:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            write_output(params[1], self.tee.attestation_report(bytes(params[0].buffer)).to_bytes())
        elif cmd_id == Cmd.PROVISION:
            check_param_types(params, MEMREF_IN, MEMREF_IN, MEMREF_OUT)
            secret = self.tee.open_provisioned(bytes(params[0].buffer), bytes(params[1].buffer))
            self.tee.create_object(b"secret", secret, overwrite=True)
            write_output(params[2], hashlib.sha256(secret).digest())
        elif cmd_id == Cmd.SECRET_HASH:
            check_param_types(params, MEMREF_OUT)
            write_output(params[0], hashlib.sha256(self.tee.read_object(b"secret")).digest())
        elif cmd_id == Cmd.OBJECT_WRITE:
            check_param_types(params, MEMREF_IN, MEMREF_IN)
            self.tee.create_object(bytes(params[0].buffer), bytes(params[1].buffer), overwrite=True)
        elif cmd_id == Cmd.OBJECT_READ:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            write_output(params[1], self.tee.read_object(bytes(params[0].buffer)))
        elif cmd_id == Cmd.OBJECT_DELETE:
            check_param_types(params, MEMREF_IN)
            self.tee.delete_object(bytes(params[0].buffer))
        elif cmd_id == Cmd.FILL:
            check_param_types(params, VALUE_IN, MEMREF_OUT)
            params[1].ndarray("uint8")[:] = params[0].a
        elif cmd_id == Cmd.COPY:
            check_param_types(params, MEMREF_IN, MEMREF_OUT)
            source, target = params[0].buffer, params[1].buffer
            if source.nbytes != target.nbytes:
                raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TRUSTED_APP, "sizes differ")
            target[:] = source
        elif cmd_id == Cmd.MARK_ON_CLOSE:
            check_param_types(params)
            session["mark"] = True
        else:
            raise TEEError(TEE_ERROR_NOT_SUPPORTED, TEEC_ORIGIN_TRUSTED_APP, f"unknown command {cmd_id}")


class OtherTestTA(TestTA):
    """Same code and signer, another UUID: must not unseal the test TA's blobs."""

    UUID = OTHER_TEST_TA_UUID
