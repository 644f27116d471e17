"""The client API on both transports: parameters, shared memory, errors, counters, memory cap."""

import os
import signal
import uuid

import numpy as np
import pytest

from tee_sim import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_ITEM_NOT_FOUND,
    TEE_ERROR_NOT_SUPPORTED,
    TEE_ERROR_OUT_OF_MEMORY,
    TEE_ERROR_SHORT_BUFFER,
    TEE_ERROR_TARGET_DEAD,
    TEEC_ORIGIN_API,
    TEEC_ORIGIN_TEE,
    TEEC_ORIGIN_TRUSTED_APP,
    Context,
    MemRef,
    TEEError,
    TempMemRef,
    Value,
    resolve_secure_core,
)
from tee_sim.registry import TEST_TA_UUID
from tee_sim.testing_ta import Cmd


@pytest.fixture
def session(context):
    with context.open_session(TEST_TA_UUID) as s:
        yield s


def test_value_in_out(session):
    out = session.invoke_command(Cmd.ADD, [Value(40, 2), Value(direction="out")])
    assert out[1].a == 42
    big = session.invoke_command(Cmd.ADD, [Value(1 << 62, 1 << 62), Value(direction="out")])
    assert big[1].a == 1 << 63


def test_temp_memref_round_trip(session):
    payload = bytes(range(256)) * 300
    out = session.invoke_command(
        Cmd.ECHO, [TempMemRef(payload), TempMemRef(size=len(payload) + 10, direction="out")]
    )
    assert out[1].data == payload and out[1].size == len(payload)


def test_short_buffer_reports_needed_size(session):
    out = TempMemRef(size=3, direction="out")
    with pytest.raises(TEEError) as err:
        session.invoke_command(Cmd.ECHO, [TempMemRef(b"hello world"), out])
    assert err.value.code == TEE_ERROR_SHORT_BUFFER
    assert out.size == 11


def test_handler_checks_parameter_types(session):
    with pytest.raises(TEEError) as err:
        session.invoke_command(Cmd.ADD, [TempMemRef(b"x"), Value(direction="out")])
    assert (err.value.code, err.value.origin) == (TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TRUSTED_APP)
    with pytest.raises(TEEError) as err:
        session.invoke_command(Cmd.ADD, [Value(1, 2)])
    assert err.value.code == TEE_ERROR_BAD_PARAMETERS
    # The session is still usable afterwards.
    assert session.invoke_command(Cmd.ADD, [Value(1, 2), Value(direction="out")])[1].a == 3


def test_client_rejects_malformed_parameters(session, context):
    for params in ([Value()] * 5, ["not a parameter"], [b"bytes"]):
        with pytest.raises(TEEError) as err:
            session.invoke_command(Cmd.NOTHING, params)
        assert (err.value.code, err.value.origin) == (TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API)
    for make in (
        lambda: Value(-1),
        lambda: Value(1 << 64),
        lambda: Value(direction="sideways"),
        lambda: TempMemRef(),
        lambda: TempMemRef(size=4, direction="in"),
    ):
        with pytest.raises(TEEError) as err:
            make()
        assert err.value.origin == TEEC_ORIGIN_API
    shm = context.register_shared_memory(64)
    with pytest.raises(TEEError):
        MemRef(shm, 32, 64)
    shm.release()
    with pytest.raises(TEEError) as err:
        session.invoke_command(Cmd.SCALE, [Value(2), MemRef(shm, 0, 64, "inout")])
    assert err.value.origin == TEEC_ORIGIN_API


def test_memref_of_another_context_is_refused(session, tmp_path):
    with Context("inprocess", home=tmp_path / "other") as other:
        shm = other.register_shared_memory(64)
        with pytest.raises(TEEError) as err:
            session.invoke_command(Cmd.SCALE, [Value(2), MemRef(shm, 0, 64, "inout")])
        assert err.value.origin == TEEC_ORIGIN_API


def test_unknown_command_and_unknown_ta(session, context):
    with pytest.raises(TEEError) as err:
        session.invoke_command(999)
    assert err.value.code == TEE_ERROR_NOT_SUPPORTED
    with pytest.raises(TEEError) as err:
        context.open_session(uuid.UUID(int=12345))
    assert (err.value.code, err.value.origin) == (TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE)


def test_a_trusted_app_that_fails_to_load_says_why(tmp_path, monkeypatch):
    """The error names the reason (OP-TEE would only log it): a user whose kernels are not built, or whose
    source tree shadows the installed package, is told so instead of "failed to load"."""
    from tee_sim import registry

    broken = uuid.UUID(int=54321)
    monkeypatch.setattr(registry, "trusted_apps", lambda: {broken: "tee_sim.no_such_module:TA"})
    with Context("inprocess", home=tmp_path / "device") as ctx, pytest.raises(TEEError) as err:
        ctx.open_session(broken)
    assert (err.value.code, err.value.origin) == (TEE_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE)
    assert "failed to load: No module named 'tee_sim.no_such_module'" in str(err.value)


def test_a_release_interrupted_in_its_round_trip_still_unmaps(context, monkeypatch):
    """A KeyboardInterrupt during the unregistration's round trip (a probe's Ctrl-C in load): the memory is
    released here all the same, its descriptor closed (it stayed open for the life of the process, 109 MiB
    after 150 interrupted loads)."""
    shm = context.register_shared_memory(1 << 20)
    fd = shm._fd

    def interrupted(memory):
        raise KeyboardInterrupt

    monkeypatch.setattr(context, "_release_shm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shm.release()
    assert shm.released and shm._fd is None
    if fd is not None:
        with pytest.raises(OSError):
            os.fstat(fd)
    shm.release()  # idempotent


def test_memref_zero_copy_16_mib(session, context):
    shm = context.register_shared_memory(16 << 20)
    x = shm.ndarray(np.float32, (4 << 20,))
    x[:] = np.arange(x.size, dtype=np.float32)
    session.invoke_command(Cmd.SCALE, [Value(3), MemRef(shm, 0, shm.size, "inout")])
    # The TA wrote into the very pages this array views: no copy came back.
    np.testing.assert_array_equal(x[:5], [0, 3, 6, 9, 12])
    assert x[-1] == 3 * (x.size - 1)
    # A window: only the second half is scaled.
    half = shm.size // 2
    session.invoke_command(Cmd.SCALE, [Value(2), MemRef(shm, half, half, "inout")])
    assert x[1] == 3 and x[-1] == 6 * (x.size - 1)
    session.invoke_command(Cmd.FILL, [Value(7), MemRef(shm, 0, 16, "out")])
    assert bytes(shm.buffer[:17]) == b"\x07" * 16 + bytes(shm.buffer[16:17])
    shm.release()


def test_input_memref_is_read_only_in_the_ta(session, context):
    with context.register_shared_memory(64) as shm:
        shm.ndarray(np.float32)[:] = 1
        with pytest.raises(TEEError) as err:
            session.invoke_command(Cmd.SCALE, [Value(2), MemRef(shm, 0, 64, "in")])
        assert err.value.code == TEE_ERROR_BAD_PARAMETERS  # SCALE wants inout
        assert shm.ndarray(np.float32)[0] == 1


def test_memory_cap_enforced_and_peak_reported(tmp_path):
    with Context("inprocess", home=tmp_path, memory_cap=1 << 20) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        used = s.invoke_command(Cmd.ALLOC, [Value(600 << 10, 1), Value(direction="out")])[1]
        assert used.a == 600 << 10
        with pytest.raises(TEEError) as err:
            s.invoke_command(Cmd.ALLOC, [Value(600 << 10, 1), Value(direction="out")])
        e = err.value
        assert e.code == TEE_ERROR_OUT_OF_MEMORY
        assert (
            "requested 0.6 MiB (614400 bytes)" in str(e)
            and "used 0.6 MiB" in str(e)
            and "cap 1.0 MiB" in str(e)
        )
        s.invoke_command(Cmd.FREE_ALL)
        # Not kept: freed when the TA drops it; the peak remembers it.
        out = s.invoke_command(Cmd.ALLOC, [Value(900 << 10, 0), Value(direction="out")])[1]
        assert out.b == 900 << 10
        assert ctx.memory_stats() == {"used": 0, "peak": 900 << 10, "cap": 1 << 20}
        assert s.stats()["secure_memory_peak"] == 900 << 10


def test_memory_cap_on_process_transport(process_context):
    with process_context.open_session(TEST_TA_UUID) as s:
        with pytest.raises(TEEError) as err:
            s.invoke_command(Cmd.ALLOC, [Value(65 << 20, 1), Value(direction="out")])
        assert err.value.code == TEE_ERROR_OUT_OF_MEMORY and "cap 64.0 MiB" in str(err.value)
        s.invoke_command(Cmd.ALLOC, [Value(1 << 20, 1), Value(direction="out")])
        assert process_context.memory_stats()["used"] == 1 << 20
    # Closing the session returned what the TA held.
    assert process_context.memory_stats()["used"] == 0


def test_session_counters(session, context):
    with context.register_shared_memory(1 << 20) as shm:
        session.invoke_command(Cmd.NOTHING)
        session.invoke_command(Cmd.ECHO, [TempMemRef(b"abc"), TempMemRef(size=8, direction="out")])
        session.invoke_command(Cmd.SCALE, [Value(1), MemRef(shm, 0, 1 << 20, "inout")])
    stats = session.stats()
    assert stats["invocations"] == 3
    assert stats["bytes_in"] == 3 + 16 + (1 << 20)
    assert stats["bytes_out"] == 3 + (1 << 20)
    assert stats["time_inside_s"] >= stats["ta_time_s"] > 0


def test_ta_panic_kills_its_sessions_not_the_device(context):
    s = context.open_session(TEST_TA_UUID)
    with pytest.raises(TEEError) as err:
        s.invoke_command(Cmd.PANIC)
    assert (err.value.code, err.value.origin) == (TEE_ERROR_TARGET_DEAD, TEEC_ORIGIN_TEE)
    with pytest.raises(TEEError) as err:
        s.invoke_command(Cmd.NOTHING)
    assert err.value.code == TEE_ERROR_TARGET_DEAD
    s.close()
    with context.open_session(TEST_TA_UUID) as fresh:
        assert fresh.invoke_command(Cmd.ADD, [Value(1, 1), Value(direction="out")])[1].a == 2


def test_closed_session_and_context(tmp_path):
    ctx = Context("inprocess", home=tmp_path)
    s = ctx.open_session(TEST_TA_UUID)
    s.close()
    with pytest.raises(TEEError) as err:
        s.invoke_command(Cmd.NOTHING)
    assert err.value.code == TEE_ERROR_BAD_STATE
    s2 = ctx.open_session(TEST_TA_UUID)
    ctx.close()
    assert s2.closed
    with pytest.raises(TEEError):
        ctx.open_session(TEST_TA_UUID)


def test_large_temp_memref_then_small_ones(session, context):
    big = os.urandom(6 << 20)
    out = session.invoke_command(Cmd.ECHO, [TempMemRef(big), TempMemRef(size=len(big), direction="out")])
    assert out[1].data == big
    assert context._marshalling.bounce is None  # the grown bounce buffer was not kept
    out = session.invoke_command(Cmd.ECHO, [TempMemRef(b"small"), TempMemRef(size=8, direction="out")])
    assert out[1].data == b"small"


def test_prepared_command_runs_like_invoke_command(session):
    """Session.prepare_command: the same command and input values, invoked again without marshalling;
    same counters, same errors, and only input Values accepted."""
    nothing = session.prepare_command(Cmd.NOTHING)
    sleep = session.prepare_command(Cmd.SLEEP, [Value(1)])  # 1 ms in the TA
    before = session.stats()
    for _ in range(3):
        nothing()
    sleep()
    after = session.stats()
    assert after["invocations"] == before["invocations"] + 4
    assert after["bytes_in"] == before["bytes_in"] + 16  # the one input value
    assert after["ta_time_s"] - before["ta_time_s"] >= 0.001
    assert after["secure_memory_used"] <= after["secure_memory_peak"] <= after["secure_memory_cap"] > 0
    # The TA's own checks and errors come back as from invoke_command, message included.
    wrong = session.prepare_command(Cmd.NOTHING, [Value(1)])
    with pytest.raises(TEEError) as err:
        wrong()
    assert err.value.code == TEE_ERROR_BAD_PARAMETERS and err.value.origin == TEEC_ORIGIN_TRUSTED_APP
    assert "parameter types" in str(err.value)
    for params in ([Value(direction="out")], [TempMemRef(b"x")], Value(1)):
        with pytest.raises(TEEError) as err:
            session.prepare_command(Cmd.ADD, params)
        assert err.value.origin == TEEC_ORIGIN_API
    with pytest.raises(TEEError):
        session.prepare_command(-1)
    session.close()
    with pytest.raises(TEEError) as err:
        nothing()
    assert err.value.code == TEE_ERROR_BAD_STATE


def test_secure_world_code_does_not_come_from_the_working_directory(tmp_path, monkeypatch):
    """A `tee_sim` in the caller's working directory (a source checkout beside an installed package, or a
    directory of the normal world's choosing) is not what the secure world runs."""
    shadow = tmp_path / "cwd" / "tee_sim"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the working directory shadowed tee_sim')\n")
    (shadow / "secure_world.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path / "cwd")
    with Context("process", home=tmp_path / "device", timeout=10.0) as context:
        with context.open_session(TEST_TA_UUID) as s:
            out = Value(direction="out")
            s.invoke_command(Cmd.ADD, [Value(3, 4), out])
            assert out.a == 7


def _allowed_cpus(pid: int) -> set[int]:
    """The CPUs every thread of process ``pid`` may run on (the union over its threads)."""
    return set().union(*(os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")))


def test_secure_core_is_resolved_and_checked():
    allowed = os.sched_getaffinity(0)
    assert resolve_secure_core("auto") == (min(allowed) if len(allowed) > 1 else None)
    assert resolve_secure_core("none") is None and resolve_secure_core(None) is None
    assert resolve_secure_core(str(min(allowed))) == min(allowed)
    for bad in (max(allowed) + 1, "fast", 1.5j):
        with pytest.raises(TEEError) as err:
            resolve_secure_core(bad)
        assert err.value.code == TEE_ERROR_BAD_PARAMETERS and "secure_core" in str(err.value)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs to mean anything")
def test_secure_world_runs_on_its_core_and_only_there(tmp_path, monkeypatch):
    core = max(os.sched_getaffinity(0))
    with Context("process", home=tmp_path / "a", secure_core=core) as context:
        assert context.secure_core == core
        assert _allowed_cpus(context.secure_world_pid) == {core}
        os.kill(context.secure_world_pid, signal.SIGKILL)  # the next session starts another, pinned too
        context._transport.proc.wait(timeout=10)  # reaped: the next session sees it gone
        with context.open_session(TEST_TA_UUID) as s:
            s.invoke_command(Cmd.ADD, [Value(3, 4), Value(direction="out")])
        assert _allowed_cpus(context.secure_world_pid) == {core}
        context.pin_secure_world(False)  # several callers: it floats over this process's CPUs
        assert _allowed_cpus(context.secure_world_pid) == os.sched_getaffinity(0)
        context.pin_secure_world(True)
        assert _allowed_cpus(context.secure_world_pid) == {core}
    monkeypatch.setenv("TEE_SIM_SECURE_CORE", "none")
    with Context("process", home=tmp_path / "b") as context:
        assert context.secure_core is None
        assert _allowed_cpus(context.secure_world_pid) == os.sched_getaffinity(0)
    assert Context("inprocess", home=tmp_path / "c").secure_core is None  # it runs in its caller's thread


@pytest.mark.parametrize("name,value,message", [
    ("TEE_SIM_SECURE_CORE", "abc", "$TEE_SIM_SECURE_CORE: secure_core must be 'auto', 'none' or a CPU"),
    ("TEE_SIM_SECURE_CORE", "4096", "$TEE_SIM_SECURE_CORE: secure_core 4096 is not among the CPUs"),
    ("TEE_SIM_SPIN_US", "fast", "$TEE_SIM_SPIN_US must be a number of microseconds, not 'fast'"),
    ("TEE_SIM_CALLER_SPIN_US", "", "$TEE_SIM_CALLER_SPIN_US must be a number of microseconds, not ''"),
])
def test_a_setting_from_the_environment_that_does_not_parse_is_refused_naming_it(tmp_path, monkeypatch, name,
                                                                                   value, message):
    """Was "could not convert string to float: 'fast'", or the setting's name without the variable's."""
    monkeypatch.setenv(name, value)
    with pytest.raises(TEEError) as info:
        Context("process", home=tmp_path)
    assert info.value.origin == TEEC_ORIGIN_API and info.value.message.startswith(message)
