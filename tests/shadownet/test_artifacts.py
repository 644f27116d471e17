"""Damaged, tampered, swapped and foreign artifact directories fail with the flat exceptions."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import shadownet
from shadownet.artifacts import read_artifacts
from shadownet.exceptions import ArtifactError, SecurityError
from tests.shadownet.conftest import SEED


@pytest.fixture
def copy(small_cnn, tmp_path):
    """A private copy of the small model's artifacts that a test may damage."""
    target = tmp_path / "out"
    shutil.copytree(small_cnn.out, target)
    return target


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _write_manifest(out: Path, manifest: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _rehash(out: Path, name: str) -> None:
    """What an attacker does after replacing a file: fix the (unauthenticated) manifest."""
    manifest = _manifest(out)
    manifest["files"][name]["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    _write_manifest(out, manifest)


def test_good_directory_reads(small_cnn):
    artifacts = read_artifacts(small_cnn.out)
    assert artifacts.rounds and artifacts.inputs and artifacts.outputs
    assert artifacts.buffers["input/0"].shape == artifacts.inputs[0].shape


@pytest.mark.parametrize("damage, message", [
    ("no_dir", "does not exist"),
    ("file", "not an artifact directory"),
    ("no_manifest", "manifest.json"),
    ("bad_json", "not valid JSON"),
    ("huge_int", "manifest.json is not valid JSON"),  # Python's 4300-digit limit: a bare ValueError
    ("wrong_format", "not a ShadowNet manifest"),
    ("future_version", "unknown format_version 99"),
    ("no_secrets", "secrets.sealed is missing"),
    ("no_untrusted", "untrusted.tflite is missing"),
    ("secrets_fifo", "secrets.sealed is not a regular file"),  # said "is missing" (a helper's review)
    ("untrusted_dir", "untrusted.tflite is not a regular file"),
    ("overflow", "ends past shared_memory_size"),
    ("missing_field", "malformed"),
])
def test_broken_directory_raises_artifact_error(copy, damage, message):
    target = copy
    if damage == "no_dir":
        target = copy / "nowhere"
    elif damage == "file":
        target = copy / "untrusted.tflite"
    elif damage == "no_manifest":
        (copy / "manifest.json").unlink()
    elif damage == "bad_json":
        (copy / "manifest.json").write_text("{not json")
    elif damage == "huge_int":
        key, path = '"format_version": ', copy / "manifest.json"
        path.write_text(path.read_text().replace(key, key + "9" * 5000))
    else:
        manifest = _manifest(copy)
        if damage == "wrong_format":
            manifest["format"] = "something-else"
        elif damage == "future_version":
            manifest["format_version"] = 99
        elif damage == "no_secrets":
            (copy / "secrets.sealed").unlink()
        elif damage == "no_untrusted":
            (copy / "untrusted.tflite").unlink()
        elif damage == "secrets_fifo":
            (copy / "secrets.sealed").unlink()
            os.mkfifo(copy / "secrets.sealed")
        elif damage == "untrusted_dir":
            (copy / "untrusted.tflite").unlink()
            (copy / "untrusted.tflite").mkdir()
        elif damage == "overflow":
            manifest["shared_memory_size"] = 64
        elif damage == "missing_field":
            del manifest["rounds"]
        _write_manifest(copy, manifest)
    with pytest.raises(ArtifactError, match=message) as caught:
        shadownet.load(target)
    if damage.startswith("no_") and damage != "no_dir":  # a missing file is not the manifest's fault (it said
        assert "malformed" not in str(caught.value)     # "manifest.json is malformed": a helper's probe)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
@pytest.mark.parametrize("fix_manifest", [False, True], ids=["hash-check", "trusted-app-check"])
def test_tampered_secrets_raise_security_error(copy, damage, fix_manifest):
    path = copy / "secrets.sealed"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) - 17]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    if fix_manifest:  # the manifest is public: the secure world must catch it on its own
        _rehash(copy, "secrets.sealed")
    with pytest.raises(SecurityError):
        shadownet.load(copy)


@pytest.mark.parametrize("fix_manifest", [False, True], ids=["hash-check", "trusted-app-check"])
def test_swapped_untrusted_model_raises_security_error(copy, two_by_two, fix_manifest):
    shutil.copy(two_by_two.out / "untrusted.tflite", copy / "untrusted.tflite")
    if fix_manifest:
        _rehash(copy, "untrusted.tflite")
    with pytest.raises(SecurityError):
        shadownet.load(copy)


def test_secrets_of_another_conversion_raise_security_error(copy, small_cnn, tmp_path):
    """Same model, same layout, other secrets: the TA sees they were not sealed for this untrusted model."""
    other = tmp_path / "other"
    shadownet.convert(str(small_cnn.original), str(other), scheme="shadownet", seed=SEED + 1)
    shutil.copy(other / "secrets.sealed", copy / "secrets.sealed")
    _rehash(copy, "secrets.sealed")
    with pytest.raises(SecurityError):
        shadownet.load(copy)


def test_a_manifest_edited_where_only_the_trusted_app_looks_is_refused_without_blaming_the_device(copy):
    """A key the runtime ignores, which the trusted app's digest of the manifest covers: refused there, and
    the error does not name the device's keys (the device is not the cause: a review's)."""
    manifest = _manifest(copy)
    manifest["note"] = "added"
    _write_manifest(copy, manifest)
    with pytest.raises(SecurityError, match="manifest.json is not the one converted") as caught:
        shadownet.load(copy)
    assert "this device's keys" not in str(caught.value)


def test_secrets_sealed_on_another_device_say_so(copy, small_cnn, tmp_path):
    """Loaded on a device that did not seal them (another SHADOWNET_HOME): one line that says what may be
    wrong, not only that authentication failed."""
    import os
    import subprocess
    import sys

    import numpy as np

    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "SHADOWNET_HOME": str(tmp_path / "another_device")}
    result = subprocess.run([sys.executable, "-m", "shadownet", "run", str(copy), "--input",
                             str(tmp_path / "x.npy")], env=env, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "TEE_ERROR_SECURITY" in lines[0] and "sealed by another device" in lines[0], lines
    # and which device this is (a mistyped SHADOWNET_HOME makes a new one: a helper's probe)
    assert f"this device's keys: {tmp_path / 'another_device'}, chosen by $SHADOWNET_HOME" in lines[0], lines
    # A device whose storage cannot be used (SHADOWNET_HOME a file): that is the error, not that the secrets
    # were changed or sealed elsewhere, which was added to it (a helper's walkthrough).
    (tmp_path / "a-file").write_text("not a directory")
    env["SHADOWNET_HOME"] = str(tmp_path / "a-file")
    result = subprocess.run([sys.executable, "-m", "shadownet", "run", str(copy), "--input",
                             str(tmp_path / "x.npy")], env=env, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "TEE_ERROR_STORAGE_NOT_AVAILABLE" in lines[0] and "another device" not in lines[0], lines
