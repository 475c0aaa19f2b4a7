"""Tests for needle.py: prompt construction, scoring, the results file and resuming, the memory plan."""

import copy
import json
import os
import random
import re
import subprocess
import sys

import pytest

import needle
import prepare
import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def checkpoint():
    return prepare.ensure_builtin()


@pytest.fixture(scope="module")
def smollm(checkpoint):
    return tokenizer.load(checkpoint)


@pytest.fixture
def with_bos(smollm):
    """A copy of the built-in tokenizer that adds BOS, as Llama-3's does."""
    tok = copy.copy(smollm)
    tok.add_bos = True
    return tok


# ---------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("length", [300, 1000, 7500])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_layout(smollm, length, depth):
    key = "48213"
    ids, needle_at = needle.build_prompt(smollm, length, depth, key, random.Random(0))
    needle_ids = smollm.encode(" " + needle.NEEDLE.format(key=key))
    head = smollm.encode(needle.INTRO)
    filler = length - len(head) - len(needle_ids) - len(smollm.encode(needle.QUESTION))

    assert len(ids) == length
    assert ids[needle_at:needle_at + len(needle_ids)] == needle_ids
    assert smollm.decode(ids).count(key) == 2  # the needle states the key twice
    assert abs((needle_at - len(head)) - depth * filler) <= 40, "needle more than a sentence from its depth"
    assert smollm.decode(ids).endswith(needle.QUESTION)


def test_prompt_has_one_bos(with_bos):
    ids, _ = needle.build_prompt(with_bos, 500, 0.5, "12345", random.Random(0))

    assert ids[0] == with_bos.bos_id
    assert ids.count(with_bos.bos_id) == 1


def test_builtin_prompt_has_no_bos(smollm):
    ids, _ = needle.build_prompt(smollm, 500, 0.5, "12345", random.Random(0))

    assert smollm.bos_id not in ids


def test_haystack_file_special_tokens_dropped(with_bos, tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text("First sentence here. <|im_start|> Second one follows! Third?\n\nFourth line.", encoding="utf-8")
    sentences = needle.read_haystack(str(path))

    ids, needle_at = needle.build_prompt(with_bos, 400, 0.5, "12345", random.Random(0), sentences)

    assert sentences[:2] == [" First sentence here.", " <|im_start|> Second one follows!"]
    assert len(ids) == 400
    assert ids.count(with_bos.bos_id) == 1
    assert "Fourth line." in with_bos.decode(ids)


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "no text"),
    (b"   \n\n ", "no text"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_haystack_file_errors(tmp_path, content, message):
    path = tmp_path / "hay.txt"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(needle.UsageError, match=message):
        needle.read_haystack(str(path))


def test_prompt_too_short(smollm):
    with pytest.raises(needle.UsageError, match="too short"):
        needle.build_prompt(smollm, 20, 0.5, "12345", random.Random(0))


def test_trial_prompt_same_for_every_method(smollm):
    args = needle.parse_args(["--lengths", "600"])

    first = needle.trial_prompt(smollm, 600, 0.5, 0, args, None)
    second = needle.trial_prompt(smollm, 600, 0.5, 0, args, None)
    other_trial = needle.trial_prompt(smollm, 600, 0.5, 1, args, None)

    assert first == second
    assert first[2] != other_trial[2]


# ---------------------------------------------------------------------------------------------
# Arguments and scoring


def test_parse_length():
    assert needle.parse_length("16k") == 16384
    assert needle.parse_length("128K") == 131072
    assert needle.parse_length("7500") == 7500


def test_paper_preset():
    args = needle.parse_args(["--preset", "paper"])

    assert args.lengths[0] == 16 * 1024
    assert args.lengths[-1] == 128 * 1024
    assert len(args.lengths) * len(args.depths) * args.trials == 152
    assert args.chunk_size == 256
    assert args.dtype == "bf16"
    assert needle.kvfold.num_steps(args.lengths[-1], args.chunk_size) - 1 == 511


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "--lengths must be positive"),
    (["--lengths", "abc"], "invalid --lengths"),
    (["--depths", "1.5"], r"--depths must lie in \[0, 1\]"),
    (["--methods", "fold,magic"], "unknown method 'magic'"),
    (["--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["--window", "0"], "--window must be at least 1"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(needle.UsageError, match=message):
        needle.parse_args(argv)


class FakeModel:
    device = needle.torch.device("cpu")


@pytest.mark.parametrize("reply, correct", [(" 12345. Remember it.", True), (" 1234 is it", False), ("12 345", False)])
def test_scoring_is_substring_match(smollm, monkeypatch, reply, correct):
    monkeypatch.setitem(needle.ANSWER, "fold", lambda model, ids, args, stop_ids: (smollm.encode(reply) + [2], 3))
    prompt = ([1, 2, 3], 1, "12345")

    record = needle.run_trial(FakeModel(), smollm, "fold", prompt, needle.parse_args([]))

    assert record["answer"] == reply
    assert record["correct"] is correct
    assert record["chain_depth"] == 3


# ---------------------------------------------------------------------------------------------
# Results file and resuming


def run_needle(*argv):
    return subprocess.run([sys.executable, os.path.join(HERE, "needle.py"), *argv],
                          capture_output=True, text=True, cwd=HERE, timeout=600)


def test_resume_after_interrupted_run(checkpoint, tmp_path):
    results = tmp_path / "results.jsonl"
    argv = ["--lengths", "300", "--depths", "0,1", "--methods", "fold,oneshot", "--max-new-tokens", "6",
            "--json", str(results)]

    first = run_needle(*argv)
    assert first.returncode == 0, first.stderr
    lines = results.read_text().splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    for field in ("method", "model", "dtype", "device", "length", "prompt_tokens", "depth", "trial", "seed",
                  "chunk_size", "chain_depth", "expected", "answer", "correct", "seconds", "peak_memory_bytes"):
        assert field in records[0], field
    assert "fold and oneshot answered identically on 2 of 2 trials" in first.stdout

    # Keep two finished trials and half of the third, as a run killed mid-write would leave.
    results.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    second = run_needle(*argv)

    assert second.returncode == 0, second.stderr
    assert "is not valid JSON" in second.stderr
    assert "reused 2 finished trials" in second.stderr
    finished = needle.load_results(str(results))
    assert len(finished) == 4
    assert {(r["method"], r["depth"]) for r in finished} == {(m, d) for m in ("fold", "oneshot") for d in (0.0, 1.0)}
    assert [r["expected"] for r in finished[:2]] == [r["expected"] for r in records[:2]]


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    results = [{"method": m, "length": n, "depth": d, "correct": (m == "fold" or d == 1.0), "trial": 0, "answer": ""}
               for m in ("fold", "streaming") for n in (1000, 4000) for d in (0.0, 1.0)]
    path = tmp_path / "heatmap.png"

    needle.plot_heatmaps(results, [1000, 4000], [0.0, 1.0], ["fold", "streaming"], str(path))

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Memory plan


def test_paper_dry_run_fits_40_gb():
    result = run_needle("--dry-run", "--preset", "paper", "--checkpoint", os.path.join(HERE, "configs", "llama-3.1-8b"))

    assert result.returncode == 0, result.stderr
    assert "152 per method" in result.stderr
    assert "chain depth up to 511" in result.stderr
    total_gib = float(re.search(r"fold .*= +([\d.]+) GiB", result.stderr).group(1))
    assert total_gib * 1024 ** 3 < 40e9
    assert "bf16" in result.stderr


def test_memory_plan_llama_8b_numbers():
    args = needle.llama.read_config(os.path.join(HERE, "configs", "llama-3.1-8b"))
    plan = needle.memory.plan(args, "fold", 131072, 256, 2)

    assert needle.memory.count_parameters(args) == 8_030_261_248  # Llama-3.1-8B's published parameter count
    assert plan["cache"] == 131072 * 32 * 8 * 128 * 2 * 2
    assert plan["weights"] == 2 * 8_030_261_248


def test_output_folders_created(checkpoint, tmp_path):
    results = tmp_path / "new" / "results.jsonl"
    plot = tmp_path / "plots" / "heatmap.png"

    run = run_needle("--lengths", "200", "--depths", "1", "--methods", "fold", "--max-new-tokens", "4",
                     "--json", str(results), "--plot", str(plot))

    assert run.returncode == 0, run.stderr
    assert len(results.read_text().splitlines()) == 1
    assert plot.exists()


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "300,30"], "30 is too short, the prompt needs at least"),
    (["--plot", "out.foo"], "give a .png, .pdf or .svg file name"),
])
def test_checked_before_trials(checkpoint, argv, message):
    run = run_needle(*argv)

    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert "[1/" not in run.stderr, "a trial ran before the error"
