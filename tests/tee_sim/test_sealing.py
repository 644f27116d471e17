"""Sealing and persistent objects, through the test TA (both transports) and the sealing module."""

import os
import stat
import struct
import uuid

import pytest

from tee_sim import TEE_ERROR_ITEM_NOT_FOUND, TEE_ERROR_SECURITY, Context, TEEError, TempMemRef
from tee_sim.identity import ATTESTATION_KEY_FILE, ROOT_KEY_FILE, DeviceKeys
from tee_sim.registry import OTHER_TEST_TA_UUID, TEST_TA_UUID
from tee_sim.sealing import OVERHEAD, SealingIdentity, seal, unseal
from tee_sim.testing_ta import Cmd, TestTA

SECRET = b"the weights are the asset"


def _seal(session, data: bytes) -> bytes:
    return session.invoke_command(
        Cmd.SEAL, [TempMemRef(data), TempMemRef(size=len(data) + 256, direction="out")]
    )[1].data


def _unseal(session, blob: bytes) -> bytes:
    return session.invoke_command(
        Cmd.UNSEAL, [TempMemRef(blob), TempMemRef(size=len(blob) + 16, direction="out")]
    )[1].data


def _refused(session, blob: bytes) -> bool:
    try:
        _unseal(session, blob)
    except TEEError as e:
        assert e.code == TEE_ERROR_SECURITY
        assert str(e).endswith("sealed data failed authentication")  # one opaque error, whatever was wrong
        return True
    return False


def test_seal_round_trip(context):
    with context.open_session(TEST_TA_UUID) as s:
        blob = _seal(s, SECRET)
        assert SECRET not in blob and len(blob) == len(SECRET) + OVERHEAD
        assert _unseal(s, blob) == SECRET
        assert _seal(s, SECRET) != blob  # fresh nonce each time
        assert _unseal(s, _seal(s, b"")) == b""


def test_every_single_byte_flip_and_truncation_refused(tmp_path):
    with Context("inprocess", home=tmp_path) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        blob = _seal(s, b"tiny")
        for i in range(len(blob)):
            for mask in (0x01, 0x80):
                tampered = bytearray(blob)
                tampered[i] ^= mask
                assert _refused(s, bytes(tampered)), f"flip of byte {i} accepted"
        for n in range(len(blob)):
            assert _refused(s, blob[:n]), f"truncation to {n} bytes accepted"
        assert _refused(s, blob + b"\0")


def test_blob_from_another_device_refused(tmp_path):
    with Context("inprocess", home=tmp_path / "a") as a, a.open_session(TEST_TA_UUID) as sa:
        blob = _seal(sa, SECRET)
    with Context("inprocess", home=tmp_path / "b") as b, b.open_session(TEST_TA_UUID) as sb:
        assert _refused(sb, blob)


def test_blob_of_another_ta_refused(context):
    with context.open_session(TEST_TA_UUID) as s, context.open_session(OTHER_TEST_TA_UUID) as other:
        assert _refused(other, _seal(s, SECRET))
        assert _refused(s, _seal(other, SECRET))


def test_version_policy_process_transport(tmp_path, monkeypatch):
    """An older TA refuses a newer TA's blob; a newer TA opens an older one (same device, same signer)."""
    blobs = {}
    for version in (1, 2):
        monkeypatch.setenv("TEE_SIM_TEST_TA_VERSION", str(version))
        with Context("process", home=tmp_path) as ctx, ctx.open_session(TEST_TA_UUID) as s:
            blobs[version] = _seal(s, f"v{version}".encode())
    monkeypatch.setenv("TEE_SIM_TEST_TA_VERSION", "1")
    with Context("process", home=tmp_path) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        assert _refused(s, blobs[2])
        assert _unseal(s, blobs[1]) == b"v1"
    monkeypatch.setenv("TEE_SIM_TEST_TA_VERSION", "3")
    with Context("process", home=tmp_path) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        assert _unseal(s, blobs[1]) == b"v1"
        assert _unseal(s, blobs[2]) == b"v2"


def test_version_policy_in_process(tmp_path, monkeypatch):
    with Context("inprocess", home=tmp_path) as ctx:
        monkeypatch.setattr(TestTA, "VERSION", 5)
        with ctx.open_session(TEST_TA_UUID) as s:
            newer = _seal(s, b"v5")
        monkeypatch.setattr(TestTA, "VERSION", 4)
        with ctx.open_session(TEST_TA_UUID) as s:
            assert _refused(s, newer)
            older = _seal(s, b"v4")
        monkeypatch.setattr(TestTA, "VERSION", 6)
        with ctx.open_session(TEST_TA_UUID) as s:
            assert _unseal(s, older) == b"v4" and _unseal(s, newer) == b"v5"


def _spec_key(root: bytes, signer: str, ta_uuid: uuid.UUID, version: int) -> bytes:
    """The sealing key as sealing.py's docstring specifies it, built here from the primitives."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = struct.pack("<H", len(signer)) + signer.encode() + ta_uuid.bytes + struct.pack("<I", version)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"tee_sim sealing v1", info=info).derive(root)


def test_sealing_module_known_answers():
    """Blobs in the documented format (magic "TSB1" | format u16 | version u32 | nonce | AES-256-GCM over
    the header as AAD) made independently here are opened, ``seal``'s are opened here; every wrong key,
    identity, AAD, version or byte is one opaque TEE_ERROR_SECURITY."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    root = bytes(range(32))
    ident = SealingIdentity("vendor", uuid.UUID(int=7), 3)
    # A vector: the key of (root, "vendor", UUID 7, version 2), and a blob sealed under it by hand.
    header = b"TSB1" + struct.pack("<HI", 1, 2) + bytes(12)
    blob = header + AESGCM(_spec_key(root, "vendor", uuid.UUID(int=7), 2)).encrypt(bytes(12), b"known",
                                                                                     header + b"ctx")
    assert unseal(root, ident, blob, aad=b"ctx") == b"known"  # version 2 <= 3: an upgrade reads it
    made = seal(root, ident, b"x", aad=b"ctx")
    assert len(made) == OVERHEAD + 1 and made[:10] == b"TSB1" + struct.pack("<HI", 1, 3)
    key = _spec_key(root, "vendor", uuid.UUID(int=7), 3)
    assert AESGCM(key).decrypt(made[10:22], made[22:], made[:22] + b"ctx") == b"x"
    flipped = bytearray(made)
    flipped[-1] ^= 1
    newer = b"TSB1" + struct.pack("<HI", 1, 4) + bytes(12)
    newer += AESGCM(_spec_key(root, "vendor", uuid.UUID(int=7), 4)).encrypt(bytes(12), b"x", newer + b"ctx")
    wrong = [(root, ident, made, b"other"),  # another AAD
             (root, SealingIdentity("other vendor", uuid.UUID(int=7), 3), made, b"ctx"),  # another signer
             (root, SealingIdentity("vendor", uuid.UUID(int=8), 3), made, b"ctx"),  # another TA
             (root, SealingIdentity("vendor", uuid.UUID(int=7), 2), made, b"ctx"),  # an older TA
             (bytes(32), ident, made, b"ctx"),  # another device
             (root, ident, bytes(flipped), b"ctx"), (root, ident, made[:OVERHEAD - 1], b"ctx"),
             (root, ident, newer, b"ctx")]  # a newer version's blob: no rollback
    for args in wrong:
        with pytest.raises(TEEError) as refused:
            unseal(*args[:3], aad=args[3])
        assert refused.value.code == TEE_ERROR_SECURITY and str(refused.value).endswith("authentication")


def test_device_keys_created_once_private_and_atomic(tmp_path):
    home = tmp_path / "home"
    keys = DeviceKeys.load_or_create(home)
    again = DeviceKeys.load_or_create(home)
    assert keys.root_key == again.root_key and keys.attestation_public_key == again.attestation_public_key
    for name in (ROOT_KEY_FILE, ATTESTATION_KEY_FILE):
        assert stat.S_IMODE(os.stat(home / "device" / name).st_mode) == 0o600
    for directory in (home, home / "device"):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert [p for p in (home / "device").iterdir() if p.name.endswith(".tmp")] == []


def test_persistent_objects(context):
    with context.open_session(TEST_TA_UUID) as s:

        def read(oid: bytes) -> bytes:
            return s.invoke_command(Cmd.OBJECT_READ, [TempMemRef(oid), TempMemRef(size=64, direction="out")])[
                1
            ].data

        s.invoke_command(Cmd.OBJECT_WRITE, [TempMemRef(b"model-a"), TempMemRef(b"first")])
        assert read(b"model-a") == b"first"
        s.invoke_command(Cmd.OBJECT_WRITE, [TempMemRef(b"model-a"), TempMemRef(b"second")])
        assert read(b"model-a") == b"second"
        s.invoke_command(Cmd.OBJECT_DELETE, [TempMemRef(b"model-a")])
        with pytest.raises(TEEError) as err:
            read(b"model-a")
        assert err.value.code == TEE_ERROR_ITEM_NOT_FOUND


def test_stored_objects_are_sealed_and_bound_to_their_id(tmp_path):
    with Context("inprocess", home=tmp_path) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        s.invoke_command(Cmd.OBJECT_WRITE, [TempMemRef(b"a"), TempMemRef(SECRET)])
        s.invoke_command(Cmd.OBJECT_WRITE, [TempMemRef(b"b"), TempMemRef(b"other")])
        files = {p.name: p for p in (tmp_path / "storage" / str(TEST_TA_UUID)).iterdir()}
        assert len(files) == 2 and all(SECRET not in p.read_bytes() for p in files.values())
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files.values())
        a, b = sorted(files.values(), key=lambda p: p.read_bytes() == b"")  # any order
        a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
        a.write_bytes(b_bytes)  # swap the files: each is now under the other's id
        b.write_bytes(a_bytes)
        for oid in (b"a", b"b"):
            with pytest.raises(TEEError) as err:
                s.invoke_command(Cmd.OBJECT_READ, [TempMemRef(oid), TempMemRef(size=64, direction="out")])
            assert err.value.code == TEE_ERROR_SECURITY


def test_concurrent_first_use_agrees_on_one_identity(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from tee_sim.identity import DeviceKeys; "
        "k = DeviceKeys.load_or_create(Path(sys.argv[1])); "
        "print(k.attestation_public_key.hex(), k.root_key.hex())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "home")], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    answers = {p.communicate(timeout=60)[0] for p in procs}
    assert len(answers) == 1 and all(p.returncode == 0 for p in procs)


def test_temp_key_files_of_killed_processes_are_removed(tmp_path):
    """A first use SIGKILLed between linking a key and unlinking its temp file left the temp file: a
    second name (hard link) of the live root key, never removed (a helper's probe; 1/20 random kills left
    one). The next use removes a stale one (STALE_TEMP_S old, its lock free), never one a live writer
    holds locked - in another PID namespace too (a review) - nor a fresh one; what it cannot remove (a
    directory of that name) does not stop the keys from loading."""
    import fcntl
    import signal
    import subprocess
    import sys
    import time

    from tee_sim.identity import STALE_TEMP_S

    home = tmp_path / "home"
    code = (
        "import os, signal, sys; from pathlib import Path; import tee_sim.identity as identity; "
        "real = os.unlink; "
        "identity.os.unlink = lambda p, *a, **k: os.kill(os.getpid(), signal.SIGKILL) "
        "if str(p).endswith('.tmp') else real(p, *a, **k); "
        "identity.DeviceKeys.load_or_create(Path(sys.argv[1]))"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(home)])
    assert killed.returncode == -signal.SIGKILL
    device = home / "device"
    (left,) = [p for p in device.iterdir() if p.name.endswith(".tmp")]
    assert left.read_bytes() == (device / ROOT_KEY_FILE).read_bytes()
    old = time.time() - 2 * STALE_TEMP_S
    fresh = device / f".{ROOT_KEY_FILE}.999999.0123abcd.tmp"  # a writer between its create and its lock
    fresh.write_bytes(b"")
    locked = device / f".{ROOT_KEY_FILE}.999998.4567abcd.tmp"  # a slow writer, its pid not ours to see
    locked.write_bytes(b"")
    unremovable = device / f".{ROOT_KEY_FILE}.999997.89abcdef.tmp"
    unremovable.mkdir()
    fifo = device / f".{ROOT_KEY_FILE}.999996.89abcdef.tmp"  # opened, it blocked the load (a review)
    os.mkfifo(fifo)
    for path in (left, locked, unremovable, fifo):
        os.utime(path, (old, old))
    with open(locked, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        keys = DeviceKeys.load_or_create(home)
    assert keys.root_key == (device / ROOT_KEY_FILE).read_bytes()
    assert sorted(p.name for p in device.iterdir() if p.name.endswith(".tmp")) == sorted(
        p.name for p in (fresh, locked, unremovable, fifo))


def test_temp_key_files_are_removed_by_age_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    """Without flock (ENOLCK: NFS without lockd) a stale temp was never removed (a review): its age alone."""
    import errno
    import time

    from tee_sim import identity

    home = tmp_path / "home"
    keys = DeviceKeys.load_or_create(home)
    stale = home / "device" / f".{ROOT_KEY_FILE}.999999.0123abcd.tmp"
    os.link(home / "device" / ROOT_KEY_FILE, stale)  # a writer killed after its link
    old = time.time() - 2 * identity.STALE_TEMP_S
    os.utime(stale, (old, old))

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(identity.fcntl, "flock", no_locks)
    assert DeviceKeys.load_or_create(home).root_key == keys.root_key
    assert not stale.exists() and os.stat(home / "device" / ROOT_KEY_FILE).st_nlink == 1


def test_keys_are_made_where_a_directory_cannot_be_synced(tmp_path, monkeypatch):
    """A file system that cannot fsync a directory (EINVAL): the keys were written, and the first use
    reported a failure for each (a review); syncing the directory is as far as it can go."""
    import errno
    import stat as stat_module

    from tee_sim import identity

    real = os.fsync

    def fsync(fd):
        if stat_module.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(identity.os, "fsync", fsync)
    keys = DeviceKeys.load_or_create(tmp_path / "home")
    assert keys.root_key == (tmp_path / "home" / "device" / ROOT_KEY_FILE).read_bytes()
