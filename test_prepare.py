"""Tests for prepare.py: the GGUF to Hugging Face conversion of the built-in model.

The converted folder is checked against transformers' own reading of the same GGUF file: the
tokenizer must agree, and the q/k row permutation must invert llama.cpp's.
"""

import os

import numpy as np
import pytest
import transformers

import prepare
import tokenizer


@pytest.fixture(scope="module")
def checkpoint():
    return prepare.ensure_builtin()


@pytest.fixture(scope="module")
def smollm(checkpoint):
    return tokenizer.load(checkpoint)


def llama_cpp_permute(weight, n_heads):
    """Permute rows as llama.cpp's convert_hf_to_gguf.py does for q_proj and k_proj."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.random.default_rng(0).standard_normal((3 * 64, 16)).astype(np.float32)

    roundtrip = prepare.unpermute_rope_rows(llama_cpp_permute(weight, 3), 3)

    assert np.array_equal(roundtrip, weight)
    assert not np.array_equal(llama_cpp_permute(weight, 3), weight)


# Text without whitespace runs before digits, where transformers' GGUF tokenizer (which drops the
# "smollm" pre-tokenizer's digit split) and the model's own tokenizer agree.
AGREEING_TEXTS = [
    "The pass key is 12345. Remember it.",
    "In 2024, prices rose 3.5% to $1,000,000.",
    "def f(x):\n    return x ** 2  # square\n",
    "Grüße aus Köln, Ελλάδα, Москва, 東京, 😀👍🏽",
    "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n",
]


def test_gguf_tokenizer_agrees_with_ours(checkpoint, smollm):
    gguf_tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(prepare.find_gguf()), gguf_file=prepare.GGUF_NAME)
    for text in AGREEING_TEXTS:
        expected = gguf_tok(text, add_special_tokens=False)["input_ids"]
        assert smollm.encode(text) == expected, f"token mismatch on {text!r}"


def test_gguf_tokenizer_lacks_digit_split(checkpoint, smollm):
    """transformers' GGUF conversion leaves out the digit split that llama.cpp applies for "smollm"."""
    gguf_tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(prepare.find_gguf()), gguf_file=prepare.GGUF_NAME)
    ours = smollm.encode("a  1")
    theirs = gguf_tok("a  1", add_special_tokens=False)["input_ids"]

    assert ours != theirs
    assert smollm.decode(ours) == "a  1"


def test_builtin_tokenizer_adds_no_bos(smollm):
    assert smollm.add_bos is False
    assert smollm.bos_id == 1
    assert smollm.stop_ids == [2]
