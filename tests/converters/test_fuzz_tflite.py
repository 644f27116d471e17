"""Malformed .tflite files given to ``convert``: the flatbuffer verifier, the structural checks, and a seeded
mutation campaign run in a worker subprocess (a LiteRT segfault is a reported failure, not a dead pytest)."""

import struct
import subprocess
import sys

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema_fb

from converters.graph import write_model
from converters.tflite_reader import read_model
from converters.tflite_verify import verify
from shadownet import fuzz, fuzz_mutations, fuzz_worker
from shadownet.exceptions import ModelFormatError

CAMPAIGN_SEED = 20240
CAMPAIGN_CASES = 1500


@pytest.fixture(scope="module")
def seeds():
    return fuzz_worker.seed_models()


def test_seed_models_pass_the_verifier_and_litert(seeds):
    for model in seeds:
        verify(model)
        graph = read_model(model)
        x = np.zeros(graph.tensors[graph.inputs[0]].shape, np.float32)
        assert np.all(np.isfinite(fuzz_worker._litert(model, x)))


def _root(model: bytes) -> int:
    return struct.unpack_from("<I", model)[0]


@pytest.mark.parametrize("damage, message", [
    ("root_past_end", "root table"),
    ("root_unaligned", "unaligned"),
    ("vtable_odd", "vtable"),
    ("identifier", "TFL3"),
    ("truncated", "corrupt"),
])
def test_verifier_refuses_broken_flatbuffers(seeds, damage, message):
    data = bytearray(seeds[0])
    root = _root(data)
    if damage == "root_past_end":
        struct.pack_into("<I", data, 0, len(data) + 16)
    elif damage == "root_unaligned":
        struct.pack_into("<I", data, 0, root + 2)
    elif damage == "vtable_odd":
        vtable = root - struct.unpack_from("<i", data, root)[0]
        struct.pack_into("<H", data, vtable, struct.unpack_from("<H", data, vtable)[0] + 1)
    elif damage == "identifier":
        data[4:8] = b"TFL2"
    else:
        data = data[: len(data) // 2]
    with pytest.raises(ModelFormatError, match=message):
        verify(bytes(data))
    with pytest.raises(ModelFormatError):
        read_model(bytes(data))


def test_verifier_refuses_huge_vector_lengths_and_bad_strings(seeds):
    structure = fuzz_mutations.flatbuffer_structure(seeds[0])
    for at in structure.lengths:
        data = bytearray(seeds[0])
        struct.pack_into("<I", data, at, 0x7FFFFFFF)
        with pytest.raises(ModelFormatError):
            verify(bytes(data))
    # A string's NUL terminator overwritten: the flatbuffer is otherwise intact.
    model = seeds[0]
    name = model.find(b"conv/w\x00")
    assert name > 0
    data = bytearray(model)
    data[name + len("conv/w")] = ord("X")
    with pytest.raises(ModelFormatError, match="NUL"):
        verify(bytes(data))
    # Found by the long fuzz run: a name that is not UTF-8 made LiteRT's get_output_details() raise
    # UnicodeDecodeError during convert.
    data = bytearray(model)
    data[name] = 0xFF
    with pytest.raises(ModelFormatError, match="UTF-8"):
        read_model(bytes(data))


def test_verifier_bounds_tables_shared_many_times(seeds):
    """A vector of offsets all pointing at one subgraph table: a small file the object reader would unpack
    once per entry (millions of objects); the verifier counts the tables it reads."""
    import flatbuffers

    model = schema_fb.ModelT.InitFromPackedBuf(bytearray(seeds[1]), 0)
    builder = flatbuffers.Builder(1 << 16)
    sub = model.subgraphs[0].Pack(builder)
    codes = [c.Pack(builder) for c in model.operatorCodes]
    buffers = [b.Pack(builder) for b in model.buffers]

    def vector(start, items):
        start(builder, len(items))
        for item in reversed(items):
            builder.PrependUOffsetTRelative(item)
        return builder.EndVector()

    subgraphs = vector(schema_fb.ModelStartSubgraphsVector, [sub] * 50_000)
    codes = vector(schema_fb.ModelStartOperatorCodesVector, codes)
    buffers = vector(schema_fb.ModelStartBuffersVector, buffers)
    schema_fb.ModelStart(builder)
    schema_fb.ModelAddVersion(builder, 3)
    schema_fb.ModelAddOperatorCodes(builder, codes)
    schema_fb.ModelAddSubgraphs(builder, subgraphs)
    schema_fb.ModelAddBuffers(builder, buffers)
    builder.Finish(schema_fb.ModelEnd(builder), file_identifier=b"TFL3")
    bomb = bytes(builder.Output())
    assert len(bomb) < 300_000
    with pytest.raises(ModelFormatError, match="tables"):
        verify(bomb)


def test_absent_input_litert_would_dereference_is_refused_before_litert(seeds):
    """Found by fuzzing: RESHAPE with its shape tensor index set to -1 segfaulted LiteRT's Prepare."""
    graph = read_model(seeds[0])
    i = next(i for i, op in enumerate(graph.ops) if op.kind == "RESHAPE")
    op = graph.ops[i]
    from dataclasses import replace

    graph.ops[i] = replace(op, inputs=(op.inputs[0], -1))
    data = write_model(graph)
    with pytest.raises(ModelFormatError, match="RESHAPE has no input 1"):
        read_model(data)


def test_oversized_shape_is_refused_before_litert(seeds):
    """Found by fuzzing: a damaged dimension made LiteRT allocate 18 GB (and take a minute) first."""
    structure = fuzz_mutations.flatbuffer_structure(seeds[1])
    graph = read_model(seeds[1])
    # The dims of the 'relu' tensor, [1, 2, 2, 3]: make the last one 2^30.
    data = bytearray(seeds[1])
    target = struct.pack("<4i", *graph.tensors[3].shape)
    at = bytes(data).find(target)
    assert at > 0 and (at + 12, 4) in structure.elements
    struct.pack_into("<i", data, at + 12, 1 << 30)
    with pytest.raises(ModelFormatError, match="GiB"):
        read_model(bytes(data))


def test_fuzz_campaign_convert(fuzz_work):
    report = fuzz.run_campaign("tflite", CAMPAIGN_CASES, CAMPAIGN_SEED, fuzz_work)
    print(report.summary())
    counts = report.counts()
    assert len(report.results) == CAMPAIGN_CASES
    assert not report.failures, "\n".join(f"case {r.index}: {r.outcome} [{r.mutation}] {r.detail}"
                                          for r in report.failures[:20])
    # The campaign reaches past the verifier: some mutants convert and run correctly.
    assert counts["ok"] > 0 and counts["refused:ModelFormatError"] > 0


@pytest.mark.parametrize("kind", ["crash", "hang"])
def test_the_harness_reports_a_crash_and_a_hang_instead_of_dying(fuzz_work, monkeypatch, kind):
    monkeypatch.setenv("SHADOWNET_FUZZ_SELFTEST", f"{kind}:1")
    report = fuzz.run_campaign("tflite", 3, CAMPAIGN_SEED, fuzz_work, timeout=5.0)
    assert [r.index for r in report.results] == [0, 1, 2]  # the worker restarted after case 1
    assert report.results[1].outcome == kind
    if kind == "crash":
        assert "SIGSEGV" in report.results[1].detail
    assert report.failures == [report.results[1]]


def test_cli_convert_of_mutants_is_one_line_on_stderr(fuzz_work, tmp_path):
    """The CLI turns every refusal into one line and exit status 1 (no traceback)."""
    worker = fuzz_worker.Worker("tflite", CAMPAIGN_SEED, fuzz_work)
    for index in range(4):
        data, _ = worker.mutation(index)
        model = tmp_path / f"mutant{index}.tflite"
        model.write_bytes(data)
        result = subprocess.run([sys.executable, "-m", "shadownet", "convert", str(model), "-o",
                                 str(tmp_path / f"out{index}")], capture_output=True, text=True, timeout=300,
                                env=fuzz._worker_env(fuzz_work))
        if result.returncode == 0:
            continue  # a harmless mutation
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("shadownet: error:"), \
            result.stderr
