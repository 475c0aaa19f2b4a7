"""Tests of ask.py on the built-in SmolLM2-135M-Instruct, on CPU in fp32, with short documents."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import ask
import kvfold
import model as llama
import needle
import prepare
import tokenizer as tok

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = ["What is the lighthouse keeper's name?", "What is the blue boat called?"]
MAX_NEW_TOKENS = 8
CHUNK_SIZE = 64


@pytest.fixture(scope="module")
def checkpoint():
    return prepare.ensure_builtin(log=lambda message: None)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return tok.load(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    return llama.load(checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def document():
    """Filler of about 450 tokens with two planted facts."""
    sentences = needle.haystack_sentences(random.Random(1))
    parts = [next(sentences) for _ in range(24)]
    parts.insert(5, " The lighthouse keeper's name is Marta Olsen.")
    parts.insert(18, " The blue boat is called Seagull.")
    return "".join(parts).strip()


@pytest.fixture
def document_file(tmp_path, document):
    path = tmp_path / "report.txt"
    path.write_text(document, encoding="utf-8")
    return path


def answer_ids(model, cache, doc_len, q_ids, stops):
    return list(ask.answer(model, cache, doc_len, q_ids, CHUNK_SIZE, MAX_NEW_TOKENS, stops))


def test_folded_cache_matches_oneshot(model, tokenizer, document):
    stops = ask.stop_ids(tokenizer)
    doc_ids = ask.document_ids(tokenizer, document, "chatml")
    q_ids = [ask.question_ids(tokenizer, q, "chatml") for q in QUESTIONS]
    room = max(map(len, q_ids)) + MAX_NEW_TOKENS
    cache = ask.fold_document(model, doc_ids, CHUNK_SIZE, room)
    assert cache.length == len(doc_ids)

    for question, ids in zip(QUESTIONS, q_ids):
        folded = answer_ids(model, cache, len(doc_ids), ids, stops)
        prompt = doc_ids + ids
        fresh = model.new_cache(len(prompt) + MAX_NEW_TOKENS)
        fresh, logits = kvfold.fold(model, prompt, len(prompt), cache=fresh)
        oneshot = kvfold.greedy(model, fresh, logits, MAX_NEW_TOKENS, stops)
        assert folded == oneshot, f"{question!r}: folded {tokenizer.decode(folded)!r}, one-shot {tokenizer.decode(oneshot)!r}"


def test_saved_cache_gives_same_answer(model, tokenizer, checkpoint, document, tmp_path):
    stops = ask.stop_ids(tokenizer)
    doc_ids = ask.document_ids(tokenizer, document, "chatml")
    q_ids = ask.question_ids(tokenizer, QUESTIONS[0], "chatml")
    room = len(q_ids) + MAX_NEW_TOKENS
    cache = ask.fold_document(model, doc_ids, CHUNK_SIZE, room)
    expected = answer_ids(model, cache, len(doc_ids), q_ids, stops)

    path = str(tmp_path / "doc.kv")
    metadata = {"model": ask.model_identity(checkpoint), "dtype": "fp32", "chunk_size": str(CHUNK_SIZE), "format": "chatml"}
    ask.save_cache(path, cache, doc_ids, metadata)
    loaded, loaded_ids = ask.load_cache(model, path, metadata, doc_ids, room)
    assert loaded_ids == doc_ids
    assert loaded.length == len(doc_ids)
    assert answer_ids(model, loaded, len(doc_ids), q_ids, stops) == expected


def test_cache_other_document_rejected(model, tokenizer, checkpoint, document, tmp_path):
    doc_ids = ask.document_ids(tokenizer, document, "chatml")
    cache = ask.fold_document(model, doc_ids[:40], CHUNK_SIZE, 0)
    path = str(tmp_path / "doc.kv")
    metadata = {"model": ask.model_identity(checkpoint), "dtype": "fp32", "chunk_size": "64", "format": "chatml"}
    ask.save_cache(path, cache, doc_ids[:40], metadata)
    with pytest.raises(ask.UsageError, match="other token ids"):
        ask.load_cache(model, path, metadata, doc_ids, 10)


def run_ask(*args, stdin=""):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, os.path.join(HERE, "ask.py"), *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_two_questions_and_cache_other_model(document_file, tmp_path):
    cache_path = tmp_path / "doc.kv"
    result = run_ask("--file", str(document_file), "--question", QUESTIONS[0], "--question", QUESTIONS[1],
                     "--max-new-tokens", "8", "--chunk-size", "128", "--save-cache", str(cache_path))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, result.stdout
    assert "folding:" in result.stderr

    # Rewrite the cache file as if another model had made it.
    tensors = load_file(str(cache_path))
    with open(cache_path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    metadata = dict(header["__metadata__"], model="0" * 64 + ":other-model")
    save_file(tensors, str(cache_path), metadata=metadata)
    result = run_ask("--file", str(document_file), "--load-cache", str(cache_path), "--question", QUESTIONS[0])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ask.py: error: cache file")
    assert "other-model" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "contains no text"),
    (b"\xff\xfe caf\xe9", "not UTF-8"),
])
def test_cli_bad_file(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    result = run_ask("--file", str(path), "--question", "Why?")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_corrupt_cache(document_file, tmp_path):
    path = tmp_path / "corrupt.kv"
    path.write_bytes(b"not a safetensors file")
    result = run_ask("--file", str(document_file), "--load-cache", str(path), "--question", "Why?")
    assert result.returncode == 2
    assert "is not a valid safetensors file" in result.stderr
    assert "Traceback" not in result.stderr


def test_ensure_room_keeps_document(model, tokenizer, document):
    stops = ask.stop_ids(tokenizer)
    doc_ids = ask.document_ids(tokenizer, document, "chatml")
    q_ids = ask.question_ids(tokenizer, QUESTIONS[1], "chatml")
    needed = len(q_ids) + MAX_NEW_TOKENS
    roomy = ask.fold_document(model, doc_ids, CHUNK_SIZE, needed)
    expected = answer_ids(model, roomy, len(doc_ids), q_ids, stops)

    full = ask.fold_document(model, doc_ids, CHUNK_SIZE, 0)
    grown = ask.ensure_room(model, full, len(doc_ids), needed)
    assert grown.max_len == len(doc_ids) + needed
    assert answer_ids(model, grown, len(doc_ids), q_ids, stops) == expected


def test_cli_stdin_questions_from_loaded_cache(document_file, tmp_path):
    cache_path = tmp_path / "doc.kv"
    saved = run_ask("--file", str(document_file), "--question", QUESTIONS[0], "--max-new-tokens", "8",
                    "--save-cache", str(cache_path))
    assert saved.returncode == 0, saved.stderr

    # The empty line ends the questions, so the third line is never read as one.
    loaded = run_ask("--load-cache", str(cache_path), "--max-new-tokens", "8",
                     stdin=f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n\nunread question\n")
    assert loaded.returncode == 0, loaded.stderr
    assert "folding:" not in loaded.stderr
    answers = [line for line in loaded.stdout.splitlines() if line.strip()]
    assert len(answers) == 2, loaded.stdout
    assert answers[0] == saved.stdout.strip()


def test_cli_save_cache_missing_folder(document_file, tmp_path):
    path = tmp_path / "missing" / "doc.kv"
    result = run_ask("--file", str(document_file), "--question", "Why?", "--save-cache", str(path))
    assert result.returncode == 2
    assert "missing or not writable" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_example_answers_planted_facts(checkpoint):
    result = run_ask("--example", "--max-new-tokens", "16")

    assert result.returncode == 0, result.stderr
    assert "Marta Olsen" in result.stdout
    assert "4.2 million" in result.stdout
