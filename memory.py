"""Memory estimates for a model, its KV cache and one forward, from config.json alone.

needle.py prints them as a plan before the first trial and refuses a run that does not fit on
CUDA; `--dry-run` prints them without loading weights.
"""

import torch


def count_parameters(a):
    """Return the parameter count of a Llama model, counting tied embeddings once."""
    per_layer = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
    per_layer += 3 * a.dim * a.hidden_dim + 2 * a.dim
    embeddings = a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2)
    return a.n_layers * per_layer + embeddings + a.dim


def plan(a, method, max_tokens, chunk_size, dtype_bytes, sinks=4, window=1024):
    """Estimate bytes for weights, KV cache and the scratch of the largest forward of one method.

    method is "fold", "oneshot" or "streaming"; a is a model.ModelArgs.

    NOTE: scratch is an estimate of the largest activations of one forward (MLP, q/k/v with
    their fp32 RoPE copies, the chunk's boolean mask, last-position logits). It assumes SDPA
    does not materialise the attention scores, as its flash and memory-efficient kernels don't.
    """
    if method == "oneshot":
        cache_len, chunk, keys = max_tokens, max_tokens, max_tokens
    elif method == "streaming":
        cache_len = sinks + window + chunk_size
        chunk, keys = min(chunk_size, max_tokens), min(cache_len, max_tokens)
    else:
        cache_len, chunk, keys = max_tokens, min(chunk_size, max_tokens), max_tokens
    qkv = chunk * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    scratch = dtype_bytes * (4 * chunk * a.hidden_dim + 6 * chunk * a.dim + qkv) + 4 * 2 * qkv
    scratch += chunk * keys + 4 * a.vocab_size
    return {
        "weights": count_parameters(a) * dtype_bytes,
        "cache": 2 * a.n_layers * a.n_kv_heads * a.head_dim * cache_len * dtype_bytes,
        "scratch": scratch,
    }


def free_bytes(device):
    """Return the free memory of a torch device in bytes (MemAvailable on CPU), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
