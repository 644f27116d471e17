"""Malformed artifacts given to ``load`` and ``run``: seeded mutation campaigns of untrusted.tflite,
secrets.sealed, manifest.json and the sealed TEE program (worker subprocesses: a crash is a reported
failure), the regressions they found, and the CLI's one line on stderr."""

import subprocess
import sys

import numpy as np
import pytest

import shadownet
from converters.fidelity import relative_error
from shadownet import fuzz, fuzz_worker
from shadownet.exceptions import ArtifactError, SecurityError
from tests.shadownet.hardening import (
    copy_artifacts,
    protect_small,
    read_manifest,
    rehash,
    reseal,
    write_manifest,
)

CAMPAIGN_SEED = 20241
CASES = {"untrusted": 300, "secrets": 300, "manifest": 700, "program": 700}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return protect_small(tmp_path_factory.mktemp("small"))


@pytest.mark.parametrize("target", list(CASES))
def test_fuzz_campaign(fuzz_work, target):
    report = fuzz.run_campaign(target, CASES[target], CAMPAIGN_SEED, fuzz_work)
    print(report.summary())
    assert len(report.results) == CASES[target]
    assert not report.failures, "\n".join(f"case {r.index}: {r.outcome} [{r.mutation}] {r.detail}"
                                          for r in report.failures[:20])
    counts = report.counts()
    assert counts["ok"] > 0  # some mutations are harmless (and then the results are right)
    refused = {k for k in counts if k.startswith("refused:")}
    expected = {"untrusted": {"refused:SecurityError"}, "secrets": {"refused:SecurityError"}}.get(target)
    if expected is not None:  # nothing but authentication failures for the two hashed files
        assert refused == expected


def test_a_shifted_buffer_offset_is_refused_not_run_with_the_wrong_layout(small, tmp_path):
    """Found by reasoning about the fuzzer's numeric tweaks: an aligned, in-bounds offset in manifest.json
    (a damaged digit) made the runtime read and write other bytes than the TA: wrong results. The manifest
    is now bound to the sealed secrets."""
    copy = copy_artifacts(small.out, tmp_path / "copy")
    manifest = read_manifest(copy)
    buffers = {b["name"]: b for b in manifest["buffers"]}
    out = buffers["output/0"]
    # Any free aligned spot of the same size inside the shared memory.
    out["offset"] = 0 if out["offset"] else 64 * ((manifest["shared_memory_size"] - out["nbytes"]) // 64)
    write_manifest(copy, manifest)
    with pytest.raises(SecurityError, match="manifest.json is not the one"):
        shadownet.load(copy)


@pytest.mark.parametrize("field, value", [
    ("shared_memory_size", "4096"), ("buffers", {"a": 1}), ("inputs", [{"name": 3}]), ("ta_uuid", 7),
    ("signature", {"key": "k", "inputs": [], "outputs": {}}), ("masks", [1]), ("format_version", [1]),
    ("shared_memory_size", 10 ** 30), ("files", {"untrusted.tflite": {"sha256": "xyz"}}),
])
def test_type_confusion_in_the_manifest_is_an_artifact_error(small, tmp_path, field, value):
    copy = copy_artifacts(small.out, tmp_path / "copy")
    manifest = read_manifest(copy)
    manifest[field] = value
    write_manifest(copy, manifest)
    with pytest.raises(ArtifactError):
        shadownet.load(copy)


def test_unknown_manifest_fields_are_ignored_and_descriptions_are_not_bound(small, tmp_path):
    copy = copy_artifacts(small.out, tmp_path / "copy")
    manifest = read_manifest(copy)
    manifest["created_by"] = "someone else"
    manifest["summary"] = {}
    write_manifest(copy, manifest)
    x = small.input()
    with shadownet.load(copy) as model:
        assert relative_error(model(x), small.reference(x)) <= fuzz_worker.TOLERANCE


def test_a_new_manifest_field_is_bound(small, tmp_path):
    copy = copy_artifacts(small.out, tmp_path / "copy")
    manifest = read_manifest(copy)
    manifest["unknown_field"] = 1
    write_manifest(copy, manifest)
    with pytest.raises(SecurityError):
        shadownet.load(copy)


@pytest.mark.parametrize("name", ["untrusted.tflite", "secrets.sealed", "manifest.json"])
def test_cli_run_on_damaged_artifacts_is_one_line_on_stderr(small, tmp_path, name):
    copy = copy_artifacts(small.out, tmp_path / "copy")
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    if name != "manifest.json":
        rehash(copy, name)
    np.save(tmp_path / "x.npy", small.input())
    result = subprocess.run([sys.executable, "-m", "shadownet", "run", str(copy), "--input",
                             str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("shadownet: error:"), result.stderr


def test_a_container_flip_that_leaves_another_well_formed_program_counts_as_a_program_change(fuzz_work):
    """Found by the seed-4 campaign: a bit flip in the container's JSON renamed a push's "input_index" to
    "input_iodex"; the TA ran the program that says (no input mixing on that push) and the harness called
    it wrong. Like a JSON mutation, a container mutation that still parses to another program is an
    authenticated program computing what it says: "differs". One that does not parse, or that
    parses to the same program, is not."""
    worker = fuzz_worker.Worker("program", 0, fuzz_work)
    original = worker.program
    header_end = 16 + int.from_bytes(original[8:16], "little")
    at = original.index(b'"input_index"', 0, header_end)
    renamed = original[:at] + b'"input_iodex"' + original[at + len(b'"input_index"'):]
    assert worker._program_changed(renamed)
    assert not worker._program_changed(original)
    broken = original[:at] + b'"input_index:' + original[at + len(b'"input_index"'):]  # not JSON any more
    assert not worker._program_changed(broken)


def test_a_mask_not_shaped_as_its_buffer_is_refused_before_anything_is_made_for_it(small, tmp_path):
    """Fuzz seed 48 (program, case 294): a one-time mask's shape edited to [1, 2**31, ...] had the trusted
    app lay a shaped mask's frequency bands over 2**31 positions before anything checked the shape: the
    secure world was killed for its memory. A mask is now checked against its buffer first."""
    from tee_sim.program import read_program, write_program

    header, arrays = read_program(small.program)
    masks = header["one_time"]["masks"]
    assert masks
    for spec in masks.values():
        spec["shape"][1] = 2 ** 31
    copy = copy_artifacts(small.out, tmp_path / "copy")
    reseal(copy, write_program(header, arrays))
    with pytest.raises(ArtifactError, match="is not that of its buffer"):
        shadownet.load(copy)

