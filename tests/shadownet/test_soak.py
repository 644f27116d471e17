"""``python -m shadownet.soak``'s arguments (the soak itself takes minutes: BENCHMARKS.md has its figures)."""

import pytest

from shadownet.soak import main


def test_artifacts_need_the_original_model_file(tmp_path, capsys):
    """``--artifacts`` are compared with LiteRT on the model they came from: a zoo name is not that file."""
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "resnet44", "--artifacts", str(tmp_path)])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("--artifacts: --model must be the .tflite they were converted from, not 'resnet44'")


def _chain(two_inputs: bool = False) -> bytes:
    """Two 3x3 convolutions in a row, both results outputs (or, ``two_inputs``, added to a second input)."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model
    from tests.shadownet.small_models import relu_conv_chain

    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_tensor("x", (1, 8, 8, 4), np.float32)
    inputs, outputs = [x], relu_conv_chain(g, x, 2, (1, 8, 8, 4), 3, 0.3, rng)
    if two_inputs:
        z = g.add_tensor("z", (1, 8, 8, 4), np.float32)
        s = g.add_tensor("s", (1, 8, 8, 4), np.float32)
        g.add_op("ADD", [outputs[-1], z], [s], fb.AddOptionsT())
        inputs, outputs = [x, z], [s]
    g.inputs, g.outputs = inputs, outputs
    return write_model(g)


def test_a_model_with_two_outputs_is_checked_output_by_output(tmp_path):
    """Each call's outputs, in the model's order, against LiteRT's on the original."""
    import warnings

    import shadownet
    from shadownet.soak import soak

    original = tmp_path / "chain.tflite"
    original.write_bytes(_chain())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(str(original), str(tmp_path / "out"), seed=4)
    figures = soak(original, tmp_path / "out", 24, 2, pool_size=3, fresh_every=6, warmup=6)
    assert figures["calls"] == 24 and figures["fresh_inputs_checked"] == 4
    assert figures["failures"] == [] and figures["wrong"] == 0 and figures["worst_relative_error"] <= 1e-4


def test_a_model_with_two_inputs_is_refused_in_one_line(tmp_path, capsys):
    import warnings

    import shadownet

    original = tmp_path / "two.tflite"
    original.write_bytes(_chain(two_inputs=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(str(original), str(tmp_path / "out"), seed=4)
    assert main(["--model", str(original), "--artifacts", str(tmp_path / "out"), "--inferences", "4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "python -m shadownet.soak: error: the soak feeds one input; two.tflite has 2"


def test_inputs_of_mixed_scales_from_several_threads(tmp_path):
    """``scales``: inputs 255x and 1/1000x the calibration's in turn, from two threads at once: every result
    right, and round 1's one-time mask moved on the inference path (it follows each input's spread)."""
    import warnings

    import shadownet
    from shadownet.soak import soak

    original = tmp_path / "chain.tflite"
    original.write_bytes(_chain())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(str(original), str(tmp_path / "out"), seed=4)
    figures = soak(original, tmp_path / "out", 24, 2, pool_size=4, fresh_every=6, warmup=6,
                   scales=(255.0, 1e-3))
    assert figures["failures"] == [] and figures["wrong"] == 0 and figures["worst_relative_error"] <= 1e-4
    assert figures["scales"] == [255.0, 1e-3] and figures["masks_moved"] >= 2


def test_scales_must_be_positive_numbers(capsys):
    for bad in ("1,x", "0", "-2", "inf"):
        with pytest.raises(SystemExit) as exit_:
            main(["--scales", bad])
        assert exit_.value.code == 2
        assert "--scales" in capsys.readouterr().err


def test_a_model_it_cannot_read_is_one_line(tmp_path, capsys):
    """A file that is no model printed a traceback (a helper's probe); --inferences 0 reported '0 wrong'."""
    (tmp_path / "junk.tflite").write_bytes(b"not a model")
    junk = str(tmp_path / "junk.tflite")
    assert main(["--model", junk, "--inferences", "4", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("python -m shadownet.soak: error: ")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "junk.tflite"), "--inferences", "0"])
    assert "--inferences must be at least 1" in capsys.readouterr().err
    # A zoo name misspelt: the zoo's child failed with a CalledProcessError traceback (a review).
    assert main(["--model", "resnet45", "--inferences", "4", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "neither a .tflite file nor a zoo model" in err.strip().splitlines()[-1]


def test_a_tampered_artifact_is_an_error_not_a_usage_error(tmp_path, capsys):
    """SecurityError became a ValueError (as LiteRT's error for a model it cannot open), and the soak took
    a tampered artifact for a model it cannot feed: exit 2, a usage error (a review). It is 1."""
    import warnings

    import shadownet

    original = tmp_path / "chain.tflite"
    original.write_bytes(_chain())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(str(original), str(tmp_path / "out"), seed=4)
    sealed = tmp_path / "out" / "secrets.sealed"
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 1
    sealed.write_bytes(bytes(data))
    assert main(["--model", str(original), "--artifacts", str(tmp_path / "out"), "--inferences", "4"]) == 1
    assert "python -m shadownet.soak: error: " in capsys.readouterr().err.strip().splitlines()[-1]
