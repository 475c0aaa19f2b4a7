"""Per-step drift of KV-Fold against a float64 one-shot reference, with the rounding floor beside it.

The reference is one float64 forward of the whole text (model loaded in float64): its KV cache,
the final hidden states of every position and, through lm_head, the next-token distributions.
For every fold step t at each (dtype, chunk size) this file measures, for chunk t's positions:
- key_err, value_err: ||x - ref|| / ||ref|| (Frobenius) of the keys and values the fold wrote,
  per layer and averaged over layers; kv_err is the mean of the two averages;
- hidden_err: the same relative error of the final hidden states (after the last norm);
- kl: mean over the chunk's positions of KL(ref || fold) of the next-token distributions.
The same quantities for a one-shot forward at the same dtype, cut into the same chunk slices,
give the rounding floor: the error that plain rounding causes with no folding at all.

Plateau: let e_t be a series over chain depth t (t = 0 for the first step), m_t the median of
e_{t-4..t} (fewer values at the start), and L the median of the last quarter of the steps (at
least 3). The plateau starts at the first depth after which every m_t lies within a factor 2 of
L, and its level is L. The floor level is the same L statistic over the one-shot series.

NOTE: fold_drift repeats kvfold.fold's loop, because it needs the hidden states of each chunk and
kvfold.step does not return them. lm_head is applied in float64 to the (upcast) hidden states of both
runs, so kl measures the drift of the hidden states and excludes lm_head's own rounding.

    python drift.py                                  # built-in model, CPU, fp32 and bf16
    python drift.py --tokens 7000 --dtypes fp32 --out drift.csv --plot drift.png
"""

import csv
import json
import random
import statistics
import sys
import time

import torch

import kvfold
import model as llama
import needle
import tokenizer as tok

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Sized for a 10-minute budget on 2 CPU cores: a float64 reference, then a one-shot and two folds at
# fp32 and at bf16. See the README for the measured time.
DEFAULT_TOKENS = 7168
DEFAULT_CHUNK_SIZES = (256, 512)
DEFAULT_DTYPES = ("fp32", "bf16")

UsageError = needle.UsageError


# ---------------------------------------------------------------------------------------------
# Input text


def text_tokens(tokenizer, n_tokens, text=None, seed=0):
    """Return the first n_tokens ids of text, or of the seeded generated haystack when text is None."""
    ids = tokenizer.encode("", bos=True) if tokenizer.add_bos else []
    if text is not None:
        ids += tokenizer.encode(text)
        if len(ids) < n_tokens:
            raise UsageError(f"the text has only {len(ids)} tokens, fewer than --tokens {n_tokens}; "
                             f"use --tokens {len(ids)} or a longer file")
        return ids[:n_tokens]
    for sentence in needle.haystack_sentences(random.Random(seed)):
        if len(ids) >= n_tokens:
            break
        ids += tokenizer.encode(sentence)
    return ids[:n_tokens]


# ---------------------------------------------------------------------------------------------
# Measurement


class Reference:
    """Float64 one-shot results: KV cache, final hidden states (T, dim) and next-token log-probabilities (T, vocab).

    NOTE: log_p takes T x vocab x 8 bytes (1.2 GB for 3072 tokens of a 49152-token vocabulary);
    it is kept so that each run computes only its own log-probabilities for the KL.
    """

    def __init__(self, model64, tokens, piece=512):
        if model64.dtype != torch.float64:
            raise ValueError(f"the reference model must be float64, got {model64.dtype}")
        tokens = torch.as_tensor(tokens, device=model64.device)[None]  # (1, T)
        self.cache = model64.new_cache(tokens.shape[1])
        _, hidden = model64(tokens, self.cache, logits_for=None, return_hidden=True)
        self.hidden = hidden[0]  # (T, dim)
        self.lm_head = model64.lm_head.weight.detach()  # (vocab, dim) float64
        self.log_p = torch.cat([self.log_probs(self.hidden[i:i + piece]) for i in range(0, len(self.hidden), piece)])

    @torch.inference_mode()
    def log_probs(self, hidden):
        """Next-token log-probabilities (n, vocab) in float64 from hidden states (n, dim) of any dtype."""
        return torch.log_softmax(hidden.to(torch.float64) @ self.lm_head.T, dim=-1)


def squared_errors(x, ref):
    """Per-layer, per-position squared error and squared reference norm, each (n_layers, n), in float64.

    x and ref are caches' slices (n_layers, B, n_kv_heads, n, head_dim).
    """
    diff = x.to(torch.float64) - ref
    return diff.square().sum((1, 2, 4)), ref.square().sum((1, 2, 4))


@torch.inference_mode()
def position_errors(ref, k, v, hidden, start, end):
    """Squared errors and KL of positions start..end-1 given the keys and values a run wrote there and its hidden states (n, dim).

    Returns per-position statistics that relative_errors sums over any slice of positions.
    """
    key_sq, key_ref_sq = squared_errors(k, ref.cache.k[:, :, :, start:end])
    value_sq, value_ref_sq = squared_errors(v, ref.cache.v[:, :, :, start:end])
    ref_hidden = ref.hidden[start:end]
    ref_log_p = ref.log_p[start:end]
    kl = (ref_log_p.exp() * (ref_log_p - ref.log_probs(hidden))).sum(-1)  # (n,)
    return {"key_sq": key_sq, "key_ref_sq": key_ref_sq, "value_sq": value_sq, "value_ref_sq": value_ref_sq,
            "hidden_sq": (hidden.to(torch.float64) - ref_hidden).square().sum(-1), "hidden_ref_sq": ref_hidden.square().sum(-1),
            "kl": kl}


def relative_errors(stats, lo=0, hi=None):
    """Relative errors and mean KL of the positions lo..hi-1 of position_errors' statistics."""
    part = {name: value[..., lo:hi].sum(-1) for name, value in stats.items()}
    key_layers = (part["key_sq"] / part["key_ref_sq"]).sqrt().tolist()
    value_layers = (part["value_sq"] / part["value_ref_sq"]).sqrt().tolist()
    key_err, value_err = statistics.fmean(key_layers), statistics.fmean(value_layers)
    n = stats["kl"][lo:hi].numel()
    return {"key_err": key_err, "value_err": value_err, "kv_err": (key_err + value_err) / 2,
            "hidden_err": float((part["hidden_sq"] / part["hidden_ref_sq"]).sqrt()), "kl": float(part["kl"]) / n,
            "key_err_layers": key_layers, "value_err_layers": value_layers}


def fold_drift(model, ref, tokens, chunk_size, dtype_name=None, log=None):
    """Fold tokens chunk_size at a time and return one row of errors per step (len = kvfold.num_steps)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tokens = torch.as_tensor(tokens, device=model.device)[None]  # (1, T)
    n_tokens = tokens.shape[1]
    cache = model.new_cache(n_tokens)
    n = kvfold.num_steps(n_tokens, chunk_size)
    rows = []
    for t in range(n):
        start, end = t * chunk_size, min((t + 1) * chunk_size, n_tokens)
        _, hidden = model(tokens[:, start:end], cache, logits_for=None, return_hidden=True)
        stats = position_errors(ref, cache.k[:, :, :, start:end], cache.v[:, :, :, start:end], hidden[0], start, end)
        errors = relative_errors(stats)
        rows.append({"run": "fold", "dtype": dtype_name, "chunk_size": chunk_size, "step": t, "start": start, "end": end, **errors})
        if log and (t + 1) % max(1, n // 4) == 0:
            log(f"  fold {dtype_name} chunk {chunk_size}: step {t + 1}/{n}, kv_err {errors['kv_err']:.3g}")
    return rows


def oneshot_drift(model, ref, tokens, chunk_sizes, dtype_name=None, piece=512):
    """Run one one-shot forward at the model's dtype and return its errors cut into each chunk size's slices."""
    tokens = torch.as_tensor(tokens, device=model.device)[None]  # (1, T)
    n_tokens = tokens.shape[1]
    cache = model.new_cache(n_tokens)
    _, hidden = model(tokens, cache, logits_for=None, return_hidden=True)

    # Per-position statistics in pieces, so that only piece x vocab logits exist at a time.
    pieces = []
    for start in range(0, n_tokens, piece):
        end = min(start + piece, n_tokens)
        pieces.append(position_errors(ref, cache.k[:, :, :, start:end], cache.v[:, :, :, start:end], hidden[0, start:end], start, end))
    stats = {name: torch.cat([p[name] for p in pieces], dim=-1) for name in pieces[0]}

    rows = []
    for chunk_size in chunk_sizes:
        for t in range(kvfold.num_steps(n_tokens, chunk_size)):
            start, end = t * chunk_size, min((t + 1) * chunk_size, n_tokens)
            rows.append({"run": "oneshot", "dtype": dtype_name, "chunk_size": chunk_size, "step": t,
                         "start": start, "end": end, **relative_errors(stats, start, end)})
    return rows


def measure(checkpoint, tokens, chunk_sizes, dtype_names, device="cpu", log=None):
    """Yield the rows of each one-shot and fold pass, for each dtype in dtype_names and each chunk size."""
    log = log or (lambda message: None)
    began = time.perf_counter()
    model64 = llama.load(checkpoint, device=device, dtype=torch.float64)
    ref = Reference(model64, tokens)
    del model64  # ref keeps the cache, the hidden states and lm_head's weight
    log(f"float64 one-shot reference of {len(tokens)} tokens: {time.perf_counter() - began:.1f} s")

    for name in dtype_names:
        model = llama.load(checkpoint, device=device, dtype=DTYPES[name])
        began = time.perf_counter()
        yield oneshot_drift(model, ref, tokens, chunk_sizes, name)
        log(f"{name} one-shot: {time.perf_counter() - began:.1f} s")
        for chunk_size in chunk_sizes:
            began = time.perf_counter()
            yield fold_drift(model, ref, tokens, chunk_size, name, log)
            log(f"{name} fold, chunk {chunk_size}: {time.perf_counter() - began:.1f} s")
        del model


# ---------------------------------------------------------------------------------------------
# Plateau and summary


def plateau(series, window=5, factor=2.0):
    """Return (start depth, level) of a series as the module docstring defines them."""
    tail = max(3, len(series) // 4)
    level = statistics.median(series[-tail:])
    medians = [statistics.median(series[max(0, t - window + 1):t + 1]) for t in range(len(series))]
    start = len(series) - 1
    for t in range(len(series) - 1, -1, -1):
        inside = level / factor <= medians[t] <= level * factor if level > 0 else medians[t] == 0
        if not inside:
            break
        start = t
    return start, level


def series(rows, run, dtype_name, chunk_size, metric):
    return [r[metric] for r in rows if r["run"] == run and r["dtype"] == dtype_name and r["chunk_size"] == chunk_size]


def summarize(rows, dtype_names, chunk_sizes, metrics=("kv_err", "hidden_err", "kl")):
    """Return the printed summary table: plateau start and level, floor and ratios, per metric."""
    lines = []
    levels = {}
    header = f"{'metric':<10} {'dtype':<5} {'chunk':>5} {'steps':>5} {'plateau from':>12} {'level':>10} {'floor':>10} {'level/floor':>11}"
    lines.append(header)
    for metric in metrics:
        for name in dtype_names:
            for chunk_size in chunk_sizes:
                fold = series(rows, "fold", name, chunk_size, metric)
                if not fold:  # a run interrupted before this fold
                    continue
                start, level = plateau(fold)
                _, floor = plateau(series(rows, "oneshot", name, chunk_size, metric))
                levels[metric, name, chunk_size] = level
                ratio = f"{level / floor:11.3g}" if floor > 0 else f"{'-':>11}"
                lines.append(f"{metric:<10} {name:<5} {chunk_size:>5} {len(fold):>5} {'depth ' + str(start):>12} "
                             f"{level:10.3g} {floor:10.3g} {ratio}")
    low = [n for n in ("fp32", "fp64") if n in dtype_names]
    for name in [n for n in ("bf16", "fp16") if n in dtype_names]:
        for base in low[:1]:
            lines.append("")
            lines.append(f"plateau level ratio {name} / {base}:")
            for metric in metrics:
                for chunk_size in chunk_sizes:
                    if (metric, name, chunk_size) not in levels or (metric, base, chunk_size) not in levels:
                        continue
                    below = levels[metric, base, chunk_size]
                    ratio = f"{levels[metric, name, chunk_size] / below:.3g}" if below > 0 else "-"
                    lines.append(f"  {metric:<10} chunk {chunk_size:>5}: {ratio}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Output


def write_rows(rows, path, config):
    """Write every row to path: JSON ({"config", "rows"}) if it ends in .json, else CSV with one column per layer."""
    try:
        with open(path, "w", newline="") as f:
            if path.endswith(".json"):
                json.dump({"config": config, "rows": rows}, f)
                return
            n_layers = len(rows[0]["key_err_layers"])
            scalar = ["run", "dtype", "chunk_size", "step", "start", "end", "key_err", "value_err", "kv_err", "hidden_err", "kl"]
            writer = csv.writer(f)
            writer.writerow(scalar + [f"key_err_{i}" for i in range(n_layers)] + [f"value_err_{i}" for i in range(n_layers)])
            for r in rows:
                writer.writerow([r[c] for c in scalar] + r["key_err_layers"] + r["value_err_layers"])
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


def plot_drift(rows, dtype_names, chunk_sizes, path, metrics=("kv_err", "hidden_err", "kl")):
    """Save a PNG: one column per dtype, one row per metric, solid fold lines and dashed one-shot floors."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib; install it with: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), len(dtype_names), figsize=(4.5 * len(dtype_names), 3.2 * len(metrics)),
                             squeeze=False, sharex=True)
    for col, name in enumerate(dtype_names):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for i, chunk_size in enumerate(chunk_sizes):
                color = f"C{i}"
                fold = series(rows, "fold", name, chunk_size, metric)
                floor = series(rows, "oneshot", name, chunk_size, metric)
                ax.plot(range(len(fold)), fold, color=color, label=f"fold, chunk {chunk_size}")
                ax.plot(range(len(floor)), floor, color=color, linestyle="--", label=f"one-shot, chunk {chunk_size} slices")
            ax.set_yscale("log")
            ax.set_title(f"{name}: {metric}")
            if row == len(metrics) - 1:
                ax.set_xlabel("chain depth (fold step)")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = needle.ArgumentParser(
        description="Measure KV-Fold's per-step drift against a float64 one-shot reference, and the one-shot rounding "
                    "floor at the same dtype. Plateau: with m_t the median of the last 5 steps' errors and L the median "
                    "of the last quarter of the steps (at least 3), the plateau starts at the first chain depth after "
                    "which every m_t lies within a factor 2 of L; its level is L.")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--text", help="UTF-8 text file to read (default: the seeded generated haystack)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated haystack (default 0)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="number of tokens to fold (default %(default)s)")
    parser.add_argument("--allow-long", action="store_true",
                        help="allow --tokens beyond the model's max_position_embeddings, where RoPE was not trained")
    parser.add_argument("--chunk-sizes", default=",".join(map(str, DEFAULT_CHUNK_SIZES)),
                        help="comma-separated chunk sizes in tokens (default %(default)s)")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                        help=f"comma-separated precisions from {', '.join(DTYPES)} (default %(default)s)")
    # NOTE: only --device cpu has been run; cuda passes the same tensors through the same code.
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", help="write every series to this file: JSON if it ends in .json, else CSV")
    parser.add_argument("--plot", help="save a PNG of drift against chain depth to this file")
    args = parser.parse_args(argv)

    args.chunk_sizes = needle.parse_list(args.chunk_sizes, int, "chunk-sizes", "256,512")
    args.dtypes = needle.parse_list(args.dtypes, str, "dtypes", "fp32,bf16")
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        raise UsageError(f"unknown dtype {unknown[0]!r} in --dtypes; choose from {', '.join(DTYPES)}")
    if min(args.chunk_sizes) < 1:
        raise UsageError(f"--chunk-sizes must be positive, got {min(args.chunk_sizes)}")
    if args.tokens < 1:
        raise UsageError(f"--tokens must be positive, got {args.tokens}")
    if args.tokens < 2 * max(args.chunk_sizes):
        raise UsageError(f"--tokens {args.tokens} is too few: the largest chunk size {max(args.chunk_sizes)} needs at "
                         f"least {2 * max(args.chunk_sizes)} tokens for two fold steps")
    needle.check_device(args.device, args.dtypes, "--dtypes")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot {args.plot}: give a .png file name")
    return args


def main(argv=None):
    args = parse_args(argv)
    text = needle.read_text_file(args.text, "text file") if args.text else None
    if args.checkpoint is None:
        args.checkpoint = needle.builtin_checkpoint()
    model_args = llama.read_config(args.checkpoint)
    needle.check_length(args.tokens, model_args.max_seq_len, args.allow_long, f"--tokens {args.tokens}")
    llama.check_weights(args.checkpoint, model_args)
    for path, flag in ((args.out, "--out"), (args.plot, "--plot")):
        if path:
            needle.check_output_path(path, flag)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    began = time.perf_counter()
    tokens = text_tokens(tok.load(args.checkpoint), args.tokens, text, args.seed)
    log(f"{len(tokens)} tokens from {args.text or 'the generated haystack'}; chunk sizes {args.chunk_sizes}, "
        f"dtypes {args.dtypes}, device {args.device}")
    rows = []
    try:
        for batch in measure(args.checkpoint, tokens, args.chunk_sizes, args.dtypes, args.device, log):
            rows += batch
    except KeyboardInterrupt:
        if not rows:
            raise
        log(f"\ninterrupted; writing the {len(rows)} rows measured so far")
        if args.plot:
            log(f"--plot {args.plot} skipped: the run is incomplete, so some panels would be empty")
        args.plot = None
        interrupted = True
    else:
        interrupted = False
    measured = [d for d in args.dtypes if any(r["dtype"] == d for r in rows)]
    print(summarize(rows, measured, sorted({r["chunk_size"] for r in rows})))
    if args.out:
        config = {"checkpoint": args.checkpoint, "text": args.text, "seed": args.seed, "tokens": len(tokens),
                  "chunk_sizes": args.chunk_sizes, "dtypes": args.dtypes, "device": args.device}
        write_rows(rows, args.out, config)
        log(f"series: {args.out}")
    if args.plot:
        plot_drift(rows, args.dtypes, args.chunk_sizes, args.plot)
        log(f"plot: {args.plot}")
    log(f"total {time.perf_counter() - began:.1f} s")
    if interrupted:
        sys.exit(130)


def run():
    needle.run_command(main, "drift.py", "interrupted before any pass finished; nothing was measured")


if __name__ == "__main__":
    run()
