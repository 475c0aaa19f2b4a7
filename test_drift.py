"""Tests for drift.py: the float64 fold matches the reference, bf16 drifts, one row per step, input errors."""

import os
import subprocess
import sys

import pytest
import torch

import drift
import kvfold
import model as llama
import prepare
import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
N_TOKENS = 384
CHUNK = 100  # does not divide N_TOKENS, so the last step is a shorter chunk


@pytest.fixture(scope="module")
def checkpoint():
    return prepare.ensure_builtin()


@pytest.fixture(scope="module")
def tokens(checkpoint):
    return drift.text_tokens(tokenizer.load(checkpoint), N_TOKENS)


@pytest.fixture(scope="module")
def model64(checkpoint):
    return llama.load(checkpoint, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(model64, tokens):
    return drift.Reference(model64, tokens)


@pytest.fixture(scope="module")
def fp64_rows(model64, reference, tokens):
    return drift.fold_drift(model64, reference, tokens, CHUNK, "fp64")


def test_fp64_fold_matches_reference(fp64_rows):
    for row in fp64_rows:
        for metric in ("key_err", "value_err", "hidden_err"):
            assert row[metric] < 1e-10, f"step {row['step']}: {metric} {row[metric]:.3g}"
        assert max(row["key_err_layers"]) < 1e-10, f"step {row['step']}: worst layer key_err {max(row['key_err_layers']):.3g}"
        assert abs(row["kl"]) < 1e-10, f"step {row['step']}: kl {row['kl']:.3g}"


def test_one_row_per_fold_step(model64, fp64_rows):
    assert len(fp64_rows) == kvfold.num_steps(N_TOKENS, CHUNK)
    assert [r["step"] for r in fp64_rows] == list(range(len(fp64_rows)))
    assert fp64_rows[-1]["end"] == N_TOKENS
    assert all(len(r["key_err_layers"]) == model64.args.n_layers for r in fp64_rows)


def test_fp64_oneshot_floor_is_zero(model64, reference, tokens):
    rows = drift.oneshot_drift(model64, reference, tokens, [CHUNK, 256], "fp64")
    assert len(rows) == kvfold.num_steps(N_TOKENS, CHUNK) + kvfold.num_steps(N_TOKENS, 256)
    worst = max(r["kv_err"] for r in rows)
    assert worst < 1e-12, f"float64 one-shot against itself: kv_err {worst:.3g}"


def test_bf16_fold_drifts(checkpoint, reference, tokens):
    model = llama.load(checkpoint, dtype=torch.bfloat16)
    rows = drift.fold_drift(model, reference, tokens[:256], 128, "bf16")
    assert len(rows) == 2
    for row in rows:
        assert row["kv_err"] > 1e-4, f"step {row['step']}: kv_err {row['kv_err']:.3g}"
        assert row["hidden_err"] > 1e-4, f"step {row['step']}: hidden_err {row['hidden_err']:.3g}"
        assert row["kl"] > 0, f"step {row['step']}: kl {row['kl']:.3g}"


def test_plateau_start_and_level():
    series = [10.0, 5.0, 3.0, 1.2, 1.0, 0.9, 1.1, 1.0, 1.0, 0.95, 1.05, 1.0]
    start, level = drift.plateau(series)
    assert level == pytest.approx(1.0)
    # Medians of the last 5 steps: 3.0 at depth 4 (outside [0.5, 2]), then 1.2 at depth 5 and within the band after.
    assert start == 5


def test_bad_dtype_exits_2():
    result = subprocess.run([sys.executable, os.path.join(HERE, "drift.py"), "--dtypes", "fp8"],
                            capture_output=True, text=True, cwd=HERE, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("drift.py: error: unknown dtype 'fp8'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--chunk-sizes", "0"], "--chunk-sizes must be positive"),
    (["--chunk-sizes", "256,x"], "invalid --chunk-sizes"),
    (["--tokens", "300", "--chunk-sizes", "256"], "--tokens 300 is too few"),
    (["--tokens", "100000", "--chunk-sizes", "256"], "exceeds the model's"),
    (["--text", "/nonexistent/text.txt"], "not found"),
])
def test_bad_arguments(checkpoint, argv, message):
    with pytest.raises(drift.UsageError, match=message):
        drift.main(["--checkpoint", checkpoint, *argv])


@pytest.mark.parametrize("content, message", [
    (b"", "contains no text"),
    (b"  \n\n", "contains no text"),
    (b"\xff\xfe caf\xe9", "not UTF-8"),
    (b"A short text.", "has only"),
])
def test_bad_text_file(checkpoint, tmp_path, content, message):
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    with pytest.raises(drift.UsageError, match=message):
        drift.main(["--checkpoint", checkpoint, "--text", str(path), "--tokens", "600", "--chunk-sizes", "256"])


def test_interrupt_keeps_finished_passes(checkpoint, tmp_path, monkeypatch):
    """Ctrl-C during the second fold writes the one-shot and first fold rows, then exits with 130."""
    measured = drift.fold_drift
    calls = []

    def interrupt_second_fold(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measured(*args, **kwargs)

    monkeypatch.setattr(drift, "fold_drift", interrupt_second_fold)
    out = tmp_path / "drift.csv"

    with pytest.raises(SystemExit) as exit_info:
        drift.main(["--checkpoint", checkpoint, "--tokens", "400", "--chunk-sizes", "100,200", "--dtypes", "fp32",
                    "--out", str(out)])

    assert exit_info.value.code == 130
    runs = [line.split(",")[:3] for line in out.read_text().splitlines()[1:]]
    assert ["fold", "fp32", "100"] in runs
    assert ["oneshot", "fp32", "100"] in runs
    assert ["fold", "fp32", "200"] not in runs


def test_unwritable_output_rejected(checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(drift.UsageError, match="cannot create folder"):
        drift.main(["--checkpoint", checkpoint, "--out", str(blocker / "drift.csv")])
