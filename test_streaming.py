"""Tests for streaming.py, on CPU.

Without eviction, stream must equal kvfold.fold. After eviction, the kept layer-0 keys must equal
keys computed from scratch at the kept tokens' new cache positions, because a layer-0 key depends
only on its token and position. Every numeric assert reports the max and mean absolute difference.

Run: python -m pytest -q test_streaming.py
"""

import pytest
import torch
from tokenizers import Tokenizer

import kvfold
import model
import prepare
import streaming

TEXT = (
    "The ferry left the island at seven every morning, carrying milk churns, letters and the "
    "schoolchildren who crossed to the mainland. The captain knew every rock in the channel and "
    "steered by the church tower when the fog came down. In winter the crossing took twice as long, "
    "and the passengers stood in the cabin drinking tea from a dented urn. "
)


# ---------------------------------------------------------------------------------------------
# Helpers


def assert_close(actual, expected, atol, label):
    """Assert max |actual - expected| <= atol, and print the max and mean difference."""
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    max_diff, mean_diff = diff.max().item(), diff.mean().item()
    print(f"{label}: max abs diff {max_diff:.3g}, mean abs diff {mean_diff:.3g}")
    assert max_diff <= atol, f"{label}: max abs diff {max_diff:.3g} > {atol:g} (mean abs diff {mean_diff:.3g})"


def assert_far(actual, expected, min_max_diff, label):
    """Assert max |actual - expected| > min_max_diff, to show that a wrong method is detectable."""
    diff = (actual.double() - expected.double()).abs()
    max_diff, mean_diff = diff.max().item(), diff.mean().item()
    assert max_diff > min_max_diff, (
        f"{label}: max abs diff {max_diff:.3g} <= {min_max_diff:g} (mean abs diff {mean_diff:.3g})")


def layer0_keys_values(llm, tokens, positions):
    """Compute layer-0 keys (rotated at positions) and values (B, n_kv_heads, T, head_dim) from scratch."""
    attention = llm.layers[0].self_attn
    B, T = tokens.shape
    with torch.inference_mode():
        x = llm.layers[0].input_layernorm(llm.embed_tokens(tokens))  # (B, T, dim)
        k = attention.k_proj(x).view(B, T, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
        v = attention.v_proj(x).view(B, T, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
        cos, sin = model.rope_tables(positions, llm.inv_freq)
        return model.apply_rope(k, cos, sin), v


def tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    args = model.ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=97,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096, tie_word_embeddings=False)
    return model.Transformer(args).to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# Fixtures: the built-in model in fp32, loaded once per module


@pytest.fixture(scope="module")
def builtin_dir():
    return prepare.ensure_builtin()


@pytest.fixture(scope="module")
def ours(builtin_dir):
    return model.load(builtin_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def text_ids(builtin_dir):
    """About 900 token ids of English prose."""
    tokenizer = Tokenizer.from_file(f"{builtin_dir}/tokenizer.json")
    ids = tokenizer.encode(TEXT * 12).ids
    assert len(ids) >= 600, f"the test text has only {len(ids)} tokens"
    return ids


# ---------------------------------------------------------------------------------------------
# Without eviction, stream is a fold


@pytest.mark.parametrize("n_tokens", [100, 260])
def test_stream_matches_fold_when_prompt_fits(ours, text_ids, n_tokens):
    # 260 tokens equal sinks + window, the largest prompt that evicts nothing.
    prompt = text_ids[:n_tokens]
    folded, fold_logits = kvfold.fold(ours, prompt, 64)

    streamed, stream_logits = streaming.stream(ours, prompt, 64, sinks=4, window=256)

    assert streamed.length == n_tokens
    assert streamed.max_len == 4 + 256 + 64
    assert_close(stream_logits, fold_logits, 1e-5, f"logits, stream vs fold, {n_tokens} tokens")
    assert_close(streamed.k[:, :, :, :n_tokens], folded.k, 1e-5, f"keys, stream vs fold, {n_tokens} tokens")
    assert_close(streamed.v[:, :, :, :n_tokens], folded.v, 1e-5, f"values, stream vs fold, {n_tokens} tokens")


# ---------------------------------------------------------------------------------------------
# After eviction: the kept tokens sit at their cache positions


def test_stream_evicts_to_sinks_plus_window(ours, text_ids):
    prompt = text_ids[:100]

    cache, logits = streaming.stream(ours, prompt, 16, sinks=4, window=32)

    assert cache.length == 4 + 32
    assert cache.max_len == 4 + 32 + 16
    assert logits.shape == (1, ours.args.vocab_size)


def test_stream_layer0_keys_at_new_positions(ours, text_ids):
    # 100 tokens in chunks of 16 evict after chunks 3 to 7. The oldest kept token (text position
    # 68) is written to slot 40 and then moved 3 times, by 16, 16 and 4 slots.
    prompt = text_ids[:100]
    sinks, window = 4, 32
    cache, _ = streaming.stream(ours, prompt, 16, sinks=sinks, window=window)

    kept_tokens = torch.tensor([prompt[:sinks] + prompt[-window:]])
    expected_k, expected_v = layer0_keys_values(ours, kept_tokens, torch.arange(sinks + window))
    stale_k, _ = layer0_keys_values(ours, kept_tokens, torch.tensor(list(range(sinks)) + list(range(100 - window, 100))))

    assert_close(cache.k[0, :, :, :sinks + window], expected_k, 1e-5, "layer-0 keys after eviction")
    assert_close(cache.v[0, :, :, :sinks + window], expected_v, 1e-5, "layer-0 values after eviction")
    assert_far(cache.k[0, :, :, :sinks + window], stale_k, 0.1, "layer-0 keys left at their text positions")


def test_stream_sink_slots_untouched(ours, text_ids):
    prompt = text_ids[:100]
    first_chunk, _ = kvfold.fold(ours, prompt[:16], 16)

    cache, _ = streaming.stream(ours, prompt, 16, sinks=4, window=32)

    # The first chunk computes the sinks exactly as the fold of that chunk alone does, and no
    # eviction may change them afterwards, so the comparison is bitwise.
    assert torch.equal(cache.k[:, :, :, :4], first_chunk.k[:, :, :, :4])
    assert torch.equal(cache.v[:, :, :, :4], first_chunk.v[:, :, :, :4])


def test_stream_without_sinks_keeps_window(ours, text_ids):
    prompt = text_ids[:100]

    cache, _ = streaming.stream(ours, prompt, 16, sinks=0, window=32)

    kept_tokens = torch.tensor([prompt[-32:]])
    expected_k, _ = layer0_keys_values(ours, kept_tokens, torch.arange(32))
    assert cache.length == 32
    assert_close(cache.k[0, :, :, :32], expected_k, 1e-5, "layer-0 keys after eviction, no sinks")


def test_stream_chunk_larger_than_window(ours, text_ids):
    # Each chunk of 64 overflows the window of 16 by itself, so only its last 16 tokens stay.
    prompt = text_ids[:150]

    cache, _ = streaming.stream(ours, prompt, 64, sinks=4, window=16)

    kept_tokens = torch.tensor([prompt[:4] + prompt[-16:]])
    expected_k, _ = layer0_keys_values(ours, kept_tokens, torch.arange(20))
    assert cache.length == 20
    assert cache.max_len == 4 + 16 + 64
    assert_close(cache.k[0, :, :, :20], expected_k, 1e-5, "layer-0 keys after eviction, chunk 64, window 16")


# ---------------------------------------------------------------------------------------------
# evict on a tiny random model in fp64


def test_evict_rotation_matches_rope_at_new_position():
    # The cache is fp64, but model.rope_tables returns fp32 tables and apply_rope rotates in
    # fp32, both when the model writes a key and when evict moves it. The rotation by -d is
    # therefore exact only to fp32 rounding, measured at 1.2e-7 on keys of magnitude 2.
    llm = tiny_model(torch.float64)
    tokens = torch.randint(0, 97, (2, 40))  # a batch of 2, to check that eviction moves every row
    cache = llm.new_cache(40, batch_size=2)
    llm(tokens, cache, logits_for=None)
    assert cache.k.dtype == torch.float64

    shift = streaming.evict(cache, 2, 8, llm.inv_freq)

    kept_tokens = torch.cat([tokens[:, :2], tokens[:, -8:]], dim=1)
    expected_k, expected_v = layer0_keys_values(llm, kept_tokens, torch.arange(10))
    assert shift == 30
    assert cache.length == 10
    assert_close(cache.k[0, :, :, :10], expected_k, 1e-6, "tiny fp64 layer-0 keys, rotated by -30")
    assert_close(cache.v[0, :, :, :10], expected_v, 1e-12, "tiny fp64 layer-0 values, moved by 30")


def test_evict_overlapping_move():
    # With a shift of 3 slots and a window of 8, the source [5, 13) and the target [2, 10) overlap.
    llm = tiny_model(torch.float64)
    tokens = torch.randint(0, 97, (1, 13))
    cache = llm.new_cache(13)
    llm(tokens, cache, logits_for=None)

    shift = streaming.evict(cache, 2, 8, llm.inv_freq)

    kept_tokens = torch.cat([tokens[:, :2], tokens[:, -8:]], dim=1)
    expected_k, expected_v = layer0_keys_values(llm, kept_tokens, torch.arange(10))
    assert shift == 3
    assert_close(cache.k[0, :, :, :10], expected_k, 1e-6, "tiny fp64 layer-0 keys, overlapping move")
    assert_close(cache.v[0, :, :, :10], expected_v, 1e-12, "tiny fp64 layer-0 values, overlapping move")


@pytest.mark.parametrize("length", [0, 5, 10])
def test_evict_noop_when_cache_fits(length):
    llm = tiny_model(torch.float64)
    cache = llm.new_cache(16)
    if length:
        llm(torch.randint(0, 97, (1, length)), cache, logits_for=None)
    keys, values = cache.k.clone(), cache.v.clone()

    shift = streaming.evict(cache, 2, 8, llm.inv_freq)

    assert shift == 0
    assert cache.length == length
    assert torch.equal(cache.k, keys)
    assert torch.equal(cache.v, values)


# ---------------------------------------------------------------------------------------------
# Generation


def test_generate_runs_past_capacity(ours, text_ids, monkeypatch):
    prompt = text_ids[:30]
    cache, logits = streaming.stream(ours, prompt, 8, sinks=4, window=16)
    assert cache.max_len == 4 + 16 + 8
    evictions = []
    real_evict = streaming.evict

    def counting_evict(cache, sinks, window, inv_freq):
        evictions.append(cache.length)
        return real_evict(cache, sinks, window, inv_freq)

    monkeypatch.setattr(streaming, "evict", counting_evict)

    tokens = streaming.greedy(ours, cache, logits, 40, sinks=4, window=16)

    # The prompt leaves 20 positions filled and 39 forwards follow. The first 8 fill the cache,
    # and each eviction from the full cache of 28 frees 8 more, so generation evicts 4 times.
    assert len(tokens) == 40
    assert evictions == [28] * 4
    assert cache.length == 20 + 39 - 4 * 8


def test_generate_matches_kvfold_before_eviction(ours, text_ids):
    prompt = text_ids[:30]
    cache, logits = streaming.stream(ours, prompt, 8, sinks=4, window=16, extra=12)
    copy = ours.new_cache(cache.max_len)
    copy.k.copy_(cache.k)
    copy.v.copy_(cache.v)
    copy.length = cache.length

    # 12 free positions take 12 forwards, so the first 13 tokens come before any eviction.
    streamed = streaming.greedy(ours, cache, logits, 13, sinks=4, window=16)
    folded = kvfold.greedy(ours, copy, logits, 13)

    assert streamed == folded
    assert cache.length == cache.max_len


def test_generate_stops_at_stop_id(ours, text_ids):
    prompt = text_ids[:30]
    cache, logits = streaming.stream(ours, prompt, 8, sinks=4, window=16)
    first = streaming.greedy(ours, cache, logits, 1, sinks=4, window=16)

    tokens = streaming.greedy(ours, cache, logits, 40, stop_ids=first, sinks=4, window=16)

    assert tokens == first


# ---------------------------------------------------------------------------------------------
# Invalid arguments


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_size=0), "chunk_size must be >= 1, got 0"),
    (dict(sinks=-1), "sinks must be >= 0, got -1"),
    (dict(window=0), "window must be >= 1, got 0"),
    (dict(extra=-2), "extra must be >= 0, got -2"),
])
def test_stream_invalid_arguments_raise(kwargs, message):
    llm = tiny_model(torch.float32)
    arguments = dict(chunk_size=4, sinks=2, window=8, extra=0)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        streaming.stream(llm, [1, 2, 3], **arguments)


def test_stream_empty_prompt_raises():
    with pytest.raises(ValueError, match="the prompt is empty"):
        streaming.stream(tiny_model(torch.float32), [], 4)


@pytest.mark.parametrize("sinks, window, message", [
    (-1, 8, "sinks must be >= 0, got -1"),
    (2, 0, "window must be >= 1, got 0"),
])
def test_evict_invalid_arguments_raise(sinks, window, message):
    llm = tiny_model(torch.float32)
    with pytest.raises(ValueError, match=message):
        streaming.evict(llm.new_cache(16), sinks, window, llm.inv_freq)


def test_generate_cache_without_room_raises():
    llm = tiny_model(torch.float32)
    cache, logits = streaming.stream(llm, [1, 2, 3], 4, sinks=2, window=8)

    # The cache has 2 + 8 + 4 = 14 positions, all taken by sinks + window = 4 + 10.
    with pytest.raises(ValueError, match="cache of 14 positions has no free position after sinks \\+ window = 14"):
        streaming.greedy(llm, cache, logits, 5, sinks=4, window=10)
