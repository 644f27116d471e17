"""Attestation and provisioning: reports, the vendor's checks, secrets that only the TA can read."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shadownet.device import export_identity
from tee_sim import TEE_ERROR_SECURITY, TEEC_ORIGIN_API, Context, TEEError, TempMemRef
from tee_sim.attestation import (
    ONE_TIME_KEY,
    PROVISIONING_KEY,
    Report,
    device_identity,
    encrypt_to_report,
    key_fingerprint,
    measurement_of,
    read_device_file,
    verify_device_file,
    verify_report,
)
from tee_sim.registry import OTHER_TEST_TA_UUID, TEST_TA_UUID
from tee_sim.testing_ta import Cmd, OtherTestTA, TestTA

AAD = b"model: resnet44"


def _report(session, nonce: bytes) -> Report:
    out = session.invoke_command(Cmd.REPORT, [TempMemRef(nonce), TempMemRef(size=1024, direction="out")])
    return Report.parse(out[1].data)


def _provision(session, envelope: bytes, aad: bytes = AAD) -> bytes:
    out = session.invoke_command(
        Cmd.PROVISION, [TempMemRef(envelope), TempMemRef(aad), TempMemRef(size=32, direction="out")]
    )
    return out[2].data


def _secret_hash(session) -> bytes:
    return session.invoke_command(Cmd.SECRET_HASH, [TempMemRef(size=32, direction="out")])[0].data


def _rejected(call, *args) -> str:
    with pytest.raises(TEEError) as err:
        call(*args)
    assert (err.value.code, err.value.origin) == (TEE_ERROR_SECURITY, TEEC_ORIGIN_API)
    return str(err.value)


@pytest.fixture
def device(context):
    """(session with the test TA, the device's attestation public key)."""
    identity = device_identity(context, TEST_TA_UUID)
    with context.open_session(TEST_TA_UUID) as session:
        yield session, identity.attestation_public_key


def test_valid_report_verifies(device):
    session, device_key = device
    nonce = os.urandom(16)
    report = _report(session, nonce)
    assert verify_report(report, device_key, TestTA.measurement(), nonce, ONE_TIME_KEY) == report
    assert verify_report(report.to_bytes(), device_key.hex(), TestTA.measurement().hex(), nonce,
                         ONE_TIME_KEY) == report
    assert measurement_of("tee_sim.testing_ta:TestTA") == TestTA.measurement()


def test_forged_signature_rejected(device, tmp_path):
    session, device_key = device
    nonce = os.urandom(16)
    report = _report(session, nonce)
    for i in (0, 31, 63):
        sig = bytearray(report.signature)
        sig[i] ^= 1
        forged = Report(report.measurement, report.nonce, report.public_key, report.key_use, bytes(sig))
        assert "signature" in _rejected(verify_report, forged, device_key, TestTA.measurement(), nonce,
                                        ONE_TIME_KEY)
    # Swapping in another key (to read the secret ourselves) breaks the signature too.
    swapped = Report(report.measurement, report.nonce, os.urandom(32), report.key_use, report.signature)
    _rejected(verify_report, swapped, device_key, TestTA.measurement(), nonce, ONE_TIME_KEY)
    # Relabelled as the persistent provisioning key (for an identity file): the signature covers the use.
    relabelled = Report(report.measurement, report.nonce, report.public_key, PROVISIONING_KEY,
                        report.signature)
    assert "signature" in _rejected(verify_report, relabelled, device_key, TestTA.measurement(), nonce,
                                    PROVISIONING_KEY)
    # A genuine report of another device is not one of the pinned device.
    with Context("inprocess", home=tmp_path / "other") as other, other.open_session(TEST_TA_UUID) as s:
        foreign = _report(s, nonce)
    _rejected(verify_report, foreign, device_key, TestTA.measurement(), nonce, ONE_TIME_KEY)


def test_wrong_measurement_rejected(device, context):
    session, device_key = device
    nonce = os.urandom(16)
    report = _report(session, nonce)
    assert "measurement" in _rejected(verify_report, report, device_key, OtherTestTA.measurement(), nonce,
                                      ONE_TIME_KEY)
    with context.open_session(OTHER_TEST_TA_UUID) as other:
        _rejected(verify_report, _report(other, nonce), device_key, TestTA.measurement(), nonce, ONE_TIME_KEY)


def test_replayed_nonce_rejected(device):
    session, device_key = device
    old = _report(session, b"yesterday's challenge")
    assert "nonce" in _rejected(verify_report, old, device_key, TestTA.measurement(), b"today's challenge",
                                ONE_TIME_KEY)


def test_malformed_reports_rejected(device):
    _, device_key = device
    for junk in (b"", b"{}", b"not json", json.dumps({"format": "tee_sim-report-2"}).encode(), 42):
        _rejected(verify_report, junk, device_key, TestTA.measurement(), b"n", ONE_TIME_KEY)


def test_provisioned_secret_round_trips_into_the_ta(device, context):
    session, device_key = device
    nonce = os.urandom(16)
    report = verify_report(_report(session, nonce), device_key, TestTA.measurement(), nonce, ONE_TIME_KEY)
    secret = os.urandom(64)
    envelope = encrypt_to_report(report, secret, AAD)
    assert secret not in envelope
    assert _provision(session, envelope) == hashlib.sha256(secret).digest()
    # Re-sealed for this device: a later session (same TA) still has it.
    with context.open_session(TEST_TA_UUID) as later:
        assert _secret_hash(later) == hashlib.sha256(secret).digest()


def test_tampered_or_misdirected_envelopes_refused(device, context):
    session, device_key = device
    report = _report(session, b"n1")
    envelope = encrypt_to_report(report, b"secret", AAD)
    for i in (0, 5, 40, 70, len(envelope) - 1):
        bad = bytearray(envelope)
        bad[i] ^= 1
        with pytest.raises(TEEError) as err:
            _provision(session, bytes(bad))
        assert err.value.code == TEE_ERROR_SECURITY
    with pytest.raises(TEEError):
        _provision(session, envelope, aad=b"model: another")
    with pytest.raises(TEEError):
        _provision(session, envelope[:60])
    # Another TA cannot open what was sent to the test TA's key.
    with context.open_session(OTHER_TEST_TA_UUID) as other, pytest.raises(TEEError) as err:
        _provision(other, envelope)
    assert err.value.code == TEE_ERROR_SECURITY


def test_device_file_for_a_remote_device(tmp_path):
    """Export on the device, convert at the vendor, open on the device after a restart of its secure world."""
    home = tmp_path / "device"
    path = tmp_path / "device.json"
    with Context("process", home=home) as ctx:
        export_identity(path, context=ctx, ta_uuid=TEST_TA_UUID)
    assert not re.search(r"private|secret", path.read_text(), re.I)
    identity = read_device_file(path)
    # The vendor: check the file (pinned key = the one in the file, or one it got from the maker).
    report = verify_device_file(path, TestTA.measurement())
    verify_device_file(path, TestTA.measurement(), pinned_public_key=identity.attestation_public_key)
    _rejected(verify_device_file, path, TestTA.measurement(), os.urandom(32))
    _rejected(verify_device_file, path, OtherTestTA.measurement())
    # A genuine report on a one-time key (GET_REPORT answers any nonce) in the file's place: refused, as the
    # vendor would encrypt to a key the device forgets (a helper's review: artifacts that never loaded).
    fields = json.loads(path.read_text())
    with Context("process", home=home) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        fields["report"] = _report(s, os.urandom(16)).to_json()
    (tmp_path / "one_time.json").write_text(json.dumps(fields))
    assert "one-time key, not the provisioning key" in _rejected(
        verify_device_file, tmp_path / "one_time.json", TestTA.measurement(), identity.attestation_public_key)
    secret = os.urandom(48)
    envelope = encrypt_to_report(report, secret, AAD)
    # The provisioning key persisted (sealed): a new secure world opens it; a second export reuses the key.
    with Context("process", home=home) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        assert _provision(s, envelope) == hashlib.sha256(secret).digest()
        assert device_identity(ctx, TEST_TA_UUID).report.public_key == report.public_key
    # Another device cannot open it.
    with Context("inprocess", home=tmp_path / "other") as ctx, ctx.open_session(TEST_TA_UUID) as s:
        with pytest.raises(TEEError) as err:
            _provision(s, envelope)
        assert err.value.code == TEE_ERROR_SECURITY


DEEP = "[" * 100_000 + "]" * 100_000  # a RecursionError in json: an internal error


@pytest.mark.parametrize("text", [DEEP, '{"format": "tee_sim-device-2", "report": ' + DEEP + "}", "{}",
                                  "not json"])
def test_a_file_that_is_no_device_identity_is_refused_as_such(text, tmp_path):
    path = tmp_path / "device.json"
    path.write_text(text)
    with pytest.raises(TEEError, match="is not a device identity file") as err:
        read_device_file(path)
    assert err.value.code == TEE_ERROR_SECURITY


def test_a_device_file_of_the_older_format_says_to_export_it_again(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": "tee_sim-device-1", "report": {}}))
    with pytest.raises(TEEError, match="older format: export it again on the device") as err:
        read_device_file(path)
    assert err.value.code == TEE_ERROR_SECURITY


def test_export_identity_writes_the_file(tmp_path):
    path = tmp_path / "id.json"
    with Context("inprocess", home=tmp_path / "home") as ctx:
        export_identity(path, context=ctx, ta_uuid=TEST_TA_UUID)
    fields = json.loads(path.read_text())
    assert fields["format"] == "tee_sim-device-2" and fields["trusted_app"] == str(TEST_TA_UUID)
    assert set(fields["report"]) == {"format", "measurement", "nonce", "public_key", "key_use", "signature"}
    assert fields["report"]["key_use"] == PROVISIONING_KEY


def test_device_export_cli_writes_what_a_vendor_verifies(tmp_path):
    """``shadownet device export FILE`` in a real process on a fresh device: the file carries the device's
    attestation key and a report on the ShadowNet TA that the vendor's check accepts."""
    from tee_sim.identity import DeviceKeys
    from tee_sim.ta_shadownet import ShadowNetTA

    path = tmp_path / "id.json"
    env = {**os.environ, "SHADOWNET_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-m", "shadownet", "device", "export", str(path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"written to {path}" in result.stdout, result.stderr
    pinned = DeviceKeys.load_or_create(tmp_path / "home").attestation_public_key
    assert f"device key fingerprint {key_fingerprint(pinned)}" in result.stdout  # what the vendor pins
    report = verify_device_file(path, measurement_of(ShadowNetTA), pinned)
    assert read_device_file(path).attestation_public_key == pinned and report.public_key


_NORMAL_WORLD = """
    import hashlib, sys
    from tee_sim import default_context, TempMemRef
    from tee_sim.registry import TEST_TA_UUID
    from tee_sim.testing_ta import Cmd
    envelope = open(sys.argv[1], "rb").read()
    session = default_context().open_session(TEST_TA_UUID)
    out = session.invoke_command(Cmd.PROVISION, [TempMemRef(envelope), TempMemRef(sys.argv[2].encode()),
                                                 TempMemRef(size=32, direction="out")])[2].data
    print(out.hex(), flush=True)
    sys.stdin.readline()  # stay alive while the test reads our memory
"""


def _process_memory(pid: int) -> bytes:
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(chunks)


def test_provisioned_secret_never_in_normal_world_memory(tmp_path):
    """The normal world relays the envelope and gets only a hash: its memory never holds the secret."""
    home = tmp_path / "device"
    # The vendor (this test) encrypts to the device's exported identity; the normal world (a child
    # process with its own secure world) only relays the envelope.
    path = tmp_path / "device.json"
    with Context("process", home=home) as ctx:
        export_identity(path, context=ctx, ta_uuid=TEST_TA_UUID)
    report = verify_device_file(path, TestTA.measurement())
    secret = os.urandom(32)
    envelope_path = tmp_path / "envelope.bin"
    envelope_path.write_bytes(encrypt_to_report(report, secret, AAD))
    env = dict(os.environ, SHADOWNET_HOME=str(home))
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_NORMAL_WORLD), str(envelope_path), AAD.decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        answer = child.stdout.readline().strip()
        assert bytes.fromhex(answer.decode()) == hashlib.sha256(secret).digest(), child.stderr.read()
        memory = _process_memory(child.pid)
        assert envelope_path.read_bytes()[:64] in memory  # the scan sees what the process holds...
        assert secret not in memory  # ...and the secret is not there
        assert secret[:16] not in memory and secret[16:] not in memory
    finally:
        child.communicate(b"\n", timeout=60)


def test_report_with_a_low_order_key_cannot_be_encrypted_to():
    report = Report(bytes(32), b"n", bytes(32), ONE_TIME_KEY, bytes(64))  # the all-zero point: no secret
    with pytest.raises(TEEError) as err:
        encrypt_to_report(report, b"secret")
    assert err.value.code == TEE_ERROR_SECURITY


def test_the_shadownet_tas_measurement_covers_its_modules_and_its_c_kernels(monkeypatch, tmp_path):
    """What the ShadowNet TA runs is what a vendor pins: its Python modules and the C kernels' sources;
    a changed kernel is another measurement."""
    from tee_sim import ta_shadownet
    from tee_sim.ta_shadownet_kernels import SOURCES

    cls = ta_shadownet.ShadowNetTA
    identity, measurement = cls.code_identity(), cls.measurement()
    for module in (b"tee_sim.ta_shadownet_restore_push", b"tee_sim.ta_shadownet_linears",
                   b"tee_sim.ta_shadownet_small_ops", b"tee_sim.ta_shadownet_steps",
                   b"tee_sim.ta_shadownet_max_pool", b"tee_sim.ta_shadownet_depthwise",
                   b"tee_sim.ta_shadownet_compile"):
        assert module in identity
    # Every C source and header of the kernels, a new one too (ta_shadownet_linear_map.h, split out of
    # ta_shadownet_kernels.c at stop 45, would otherwise have left the measurement).
    names = [path.name for path in SOURCES]
    package = Path(ta_shadownet.__file__).parent
    assert sorted(names) == sorted(path.name for path in package.glob("ta_shadownet_*.[ch]"))
    assert "ta_shadownet_linear_map.h" in names
    assert all(path.read_bytes() in identity for path in SOURCES)
    # A name in each file, changed there: another measurement.
    kernels = {"kernels.h": b"fv_check_tile", "lanes.h": b"dot_groups", "linear_map.h": b"block16",
               "kernels.c": b"sn_run", "freivalds.c": b"prepare_tiled", "freivalds_check.c": b"check_rows",
               "max_pool.c": b"sn_max_pool", "depthwise.c": b"sn_depthwise", "small_ops.c": b"sn_small_op",
               "pool.c": b"fv_draw"}
    assert sorted(f"ta_shadownet_{file}" for file in kernels) == sorted(names)
    for i, source in enumerate(SOURCES):
        name = kernels[source.name.removeprefix("ta_shadownet_")]
        assert name in source.read_bytes()
        changed = tmp_path / source.name
        changed.write_bytes(source.read_bytes().replace(name, name[:-1] + b"x", 1))
        monkeypatch.setattr(cls, "CODE_FILES", tuple(changed if j == i else p for j, p in enumerate(SOURCES)))
        assert cls.measurement() != measurement


def _tee_sim_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """``module`` and every ``tee_sim`` module it imports, directly or not (function-level imports too)."""
    from tests.test_packages import module_imports, source_of

    seen = set() if seen is None else seen
    path = source_of(module)
    if module in seen or path is None:
        return seen
    seen.add(module)
    for name in module_imports(path.read_text()):
        if name.split(".")[0] == "tee_sim":
            _tee_sim_imports(name, seen)
    return seen


def test_the_shadownet_tas_measurement_lists_every_module_only_it_runs():
    """Every module the ShadowNet TA imports that the secure OS and the client do not is its own code and
    must be measured (``tee_sim.exact_split`` was not)."""
    from tee_sim import ta_shadownet

    platform: set[str] = set()
    for module in ("tee_sim", "tee_sim.secure_os", "tee_sim.secure_world", "tee_sim.client",
                   "tee_sim.transport"):
        _tee_sim_imports(module, platform)
    own = _tee_sim_imports("tee_sim.ta_shadownet") - platform - {"tee_sim.ta_shadownet"}
    assert {"tee_sim.program", "tee_sim.exact_split", "tee_sim.per_inference"} <= own  # the scan reads it
    assert own <= set(ta_shadownet.ShadowNetTA.CODE_MODULES), own - set(ta_shadownet.ShadowNetTA.CODE_MODULES)


@pytest.mark.parametrize("blocked", ["home", "storage"])
def test_an_unusable_storage_is_an_error_not_a_panic(blocked, tmp_path):
    """A home, or the objects' directory in it, that is not a directory: the device keys or the trusted
    app's objects cannot be made, and the secure OS says so to the caller (TEE_ERROR_STORAGE_NOT_AVAILABLE,
    naming the path) instead of the app that asked panicking (a probe's file in place of ``storage``)."""
    from tee_sim.errors import TEE_ERROR_STORAGE_NOT_AVAILABLE

    home = tmp_path / "a-file" if blocked == "home" else tmp_path / "home"
    if blocked == "storage":
        home.mkdir()
    (home if blocked == "home" else home / "storage").write_text("not a directory")
    with Context("inprocess", home=home) as ctx:
        with pytest.raises(TEEError) as err:
            device_identity(ctx, TEST_TA_UUID)
        assert err.value.code == TEE_ERROR_STORAGE_NOT_AVAILABLE and str(home) in err.value.message
        with pytest.raises(TEEError) as err:  # asked again, the same answer: nothing was killed
            device_identity(ctx, TEST_TA_UUID)
        assert err.value.code == TEE_ERROR_STORAGE_NOT_AVAILABLE
    command = [sys.executable, "-m", "shadownet", "device", "export", str(tmp_path / "id.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SHADOWNET_HOME": str(home)})
    assert result.returncode == 1 and not (tmp_path / "id.json").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TEE_ERROR_STORAGE_NOT_AVAILABLE" in lines[0] and str(home) in lines[0], lines
