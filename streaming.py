"""StreamingLLM baseline: a KV cache that keeps attention sinks and a recent window.

StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks")
keeps the keys and values of the first `sinks` tokens and of the most recent `window` tokens and
evicts everything between them. Each kept token gets the RoPE position of its slot in the cache,
not its position in the text. It is here as the baseline for KV-Fold, which keeps every prompt
token: a fact placed early in a long prompt falls out of this cache but stays in a folded one.

Differences from the reference code (mit-han-lab/streaming-llm, streaming_llm/kv_cache.py and
pos_shift/modify_llama.py):
- The reference caches keys before RoPE and rotates all of them at their cache positions on
  every forward. model.py caches rotated keys, so moving a key from slot p to slot p - d rotates
  it once by -d instead: R(p - d) = R(-d) R(p). The two agree up to rounding, and each move adds
  one rounding of the key to the cache dtype.
- The prompt is processed chunk_size tokens at a time and eviction runs after each chunk, so a
  query attends to up to sinks + window + chunk_size keys rather than sinks + window.
  Generation evicts only when the cache is full.
- The cache is allocated once with room for sinks + window + max(chunk_size, extra) positions,
  and kept keys are moved in place instead of concatenated into new tensors.
"""

import torch

import kvfold
from model import apply_rope, rope_tables


def validate_sinks_window(sinks, window):
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def evict(cache, sinks, window, inv_freq):
    """Keep the first `sinks` and the last `window` filled slots of the cache and drop the rest.

    The kept window moves down to the slots right after the sinks, and its keys are rotated by -d
    for a move of d slots, so each key carries the RoPE position of its new slot. Values are
    moved without rotation. Returns d, the number of evicted positions (0 when
    cache.length <= sinks + window, and the cache is then left unchanged).
    """
    validate_sinks_window(sinks, window)
    shift = cache.length - (sinks + window)
    if shift <= 0:
        return 0
    old = slice(cache.length - window, cache.length)
    new = slice(sinks, sinks + window)

    # One table row for position -shift broadcasts over the window. apply_rope rotates in fp32
    # and returns a new tensor, so the write below is safe although old and new may overlap.
    cos, sin = rope_tables(torch.tensor([-shift], device=cache.k.device), inv_freq)  # (1, head_dim)
    cache.k[:, :, :, new] = apply_rope(cache.k[:, :, :, old], cos, sin)  # (n_layers, B, n_kv_heads, window, head_dim)
    cache.v[:, :, :, new] = cache.v[:, :, :, old].clone()
    cache.length = sinks + window
    return shift


def stream(model, tokens, chunk_size, sinks=4, window=1024, extra=0):
    """Process a prompt chunk by chunk like kvfold.fold, evicting down to sinks + window after each chunk.

    tokens: a list of ids or a tensor (T,) or (B, T). extra: free positions to reserve for
    tokens generated afterwards. The new cache has room for sinks + window + max(chunk_size,
    extra) positions. Returns (cache, logits): the cache, with at most sinks + window positions filled,
    and the next-token logits (B, vocab) in fp32 after the prompt's last token.
    """
    validate_sinks_window(sinks, window)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if extra < 0:
        raise ValueError(f"extra must be >= 0, got {extra}")
    tokens = kvfold.as_batch(tokens, model.device)
    n_tokens = tokens.shape[1]
    if n_tokens == 0:
        raise ValueError("the prompt is empty; stream needs at least one token")

    cache = model.new_cache(sinks + window + max(chunk_size, extra), batch_size=tokens.shape[0])
    for start in range(0, n_tokens, chunk_size):
        logits = kvfold.step(model, cache, tokens[:, start:start + chunk_size])
        evict(cache, sinks, window, model.inv_freq)
    return cache, logits


def generate(model, cache, logits, max_new_tokens, stop_ids=(), sinks=4, window=1024):
    """Continue greedily from a streamed cache; yield each new token id as it is chosen.

    logits are the next-token logits (1, vocab) that stream returned. When the cache is full,
    it is evicted down to sinks + window positions before the next forward, so generation runs
    past the cache's capacity. Stops after a token in stop_ids (which is yielded) or after
    max_new_tokens.
    """
    validate_sinks_window(sinks, window)
    if cache.max_len <= sinks + window:
        raise ValueError(
            f"a cache of {cache.max_len} positions has no free position after sinks + window = "
            f"{sinks + window}; pass generate the sinks and window that stream was given")
    stop_ids = set(stop_ids)
    for i in range(max_new_tokens):
        token = int(logits[0].argmax())
        yield token
        if token in stop_ids or i == max_new_tokens - 1:
            return
        if cache.length >= cache.max_len:
            evict(cache, sinks, window, model.inv_freq)
        logits = model(torch.tensor([[token]], device=model.device), cache)[:, -1]


def greedy(model, cache, logits, max_new_tokens, stop_ids=(), sinks=4, window=1024):
    """Return the list of tokens that generate yields."""
    return list(generate(model, cache, logits, max_new_tokens, stop_ids, sinks, window))
