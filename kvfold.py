"""KV-Fold: a long prompt processed as a left fold over chunks, with the KV cache as accumulator.

    cache_0 = empty
    cache_t = step(cache_{t-1}, chunk_t)    for t = 1..n

One step runs chunk t through the frozen model at its absolute positions, with cache_{t-1}
(the keys and values of every earlier chunk) as the attention prefix, and appends the chunk's
new keys and values. Nothing is summarised, evicted or re-encoded: after the last step the cache
contains exactly what a one-shot prefill of the whole prompt would hold, up to floating-point
rounding, while no forward pass ever sees more than chunk_size queries. The chain depth of a
fold is its number of steps after the first.

Continuing from the folded cache with greedy decoding is one more step per generated token.
"""

import torch


def num_steps(n_tokens, chunk_size):
    return -(-n_tokens // chunk_size)


def as_batch(tokens, device):
    """Return token ids (a list, or a tensor (T,) or (B, T)) as a tensor (B, T) on device."""
    tokens = torch.as_tensor(tokens, device=device)
    return tokens[None] if tokens.dim() == 1 else tokens  # (B=1, T) for a single prompt


def step(model, cache, chunk):
    """Fold one chunk (B, C) into the cache; return the logits of its last position (B, vocab)."""
    return model(chunk, cache)[:, -1]


def fold(model, tokens, chunk_size, cache=None, on_step=None):
    """Fold a prompt into a KV cache, chunk_size tokens per step.

    tokens: a list of ids or a tensor (T,) or (B, T). cache: a cache to extend (its filled
    positions act as the prefix and the prompt continues after them), or None for a new one
    sized to the prompt. chunk_size >= T is a one-shot prefill. on_step(t, n_steps, cache), if
    given, is called after each step.

    Returns (cache, logits): the enlarged cache and the next-token logits (B, vocab) in fp32
    after the prompt's last token.
    """
    tokens = as_batch(tokens, model.device)
    n_tokens = tokens.shape[1]
    if n_tokens == 0:
        raise ValueError("fold needs at least one token")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if cache is None:
        cache = model.new_cache(n_tokens, batch_size=tokens.shape[0])
    if cache.length + n_tokens > cache.max_len:
        raise ValueError(f"{n_tokens} tokens do not fit in the cache: {cache.length} of {cache.max_len} positions are used")

    n = num_steps(n_tokens, chunk_size)
    for t in range(n):
        chunk = tokens[:, t * chunk_size:(t + 1) * chunk_size]  # the last chunk may be shorter
        logits = step(model, cache, chunk)
        if on_step is not None:
            on_step(t, n, cache)
    return cache, logits


def generate(model, cache, logits, max_new_tokens, stop_ids=()):
    """Continue greedily from a folded cache; yield each new token id as it is chosen.

    logits are the next-token logits (1, vocab) that fold returned. Stops after a token in
    stop_ids (which is yielded), after max_new_tokens, or when the cache is full.
    """
    stop_ids = set(stop_ids)
    for i in range(max_new_tokens):
        token = int(logits[0].argmax())
        yield token
        if token in stop_ids or i == max_new_tokens - 1 or cache.length >= cache.max_len:
            return
        logits = model(torch.tensor([[token]], device=model.device), cache)[:, -1]


def greedy(model, cache, logits, max_new_tokens, stop_ids=()):
    """Return the list of tokens that generate yields."""
    return list(generate(model, cache, logits, max_new_tokens, stop_ids))
