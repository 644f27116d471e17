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
