"""Prefill and decode speed of our Llama and of KV-Fold, side by side with transformers.

In one run, on one device, with the same threads and dtype, for every (dtype, length):
- ours-oneshot: model.forward over the whole prompt, logits of the last position only;
- ours-fold: kvfold.fold at --chunk-size;
- hf-oneshot: transformers' forward with logits_to_keep=1 (its default SDPA attention);
- hf-chunked: transformers' generate with prefill_chunk_size=--chunk-size and one new token;
and, per dtype, greedy decode of --decode-tokens tokens after a --decode-from-token prompt: ours
from a folded cache, transformers from its own cache (the prompts' prefill is not timed).

Each row runs in a fresh process that loads the model, warms it up and times one prefill or
decode, the fastest of up to 3 runs within 10 s. It reports:
- tokens/s;
- achieved GFLOP/s, from a FLOP count of the model's matmuls with each query's attention counted
  over the keys before it, and their fraction of a large F.linear's speed measured in the same
  run: in the same dtype, or in fp32 for bf16 and fp16 where model.Linear computes them in fp32;
- peak memory: max allocated on CUDA, or on Linux CPUs the peak RSS during the timed part (reset
  through /proc/self/clear_refs), also shown above the memory before the model was loaded.

    python bench.py                                    # built-in model, CPU, fp32 and bf16
    python bench.py --lengths 4096 --dtypes bf16 --json results/bench-bf16.json
    python bench.py --random-config configs/llama-3.1-8b/config.json --device cuda --dtypes bf16 \\
        --lengths 16384,32768,65536,131072 --methods ours-fold --decode-tokens 0
"""

import argparse
import gc
import json
import multiprocessing
import platform
import sys
import time

import torch
import torch.nn.functional as F

import drift
import kvfold
import memory
import model as llama
import needle
import tokenizer as tok

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("ours-oneshot", "ours-fold", "hf-oneshot", "hf-chunked")
DEFAULT_LENGTHS = (1024, 4096, 7680)
# A row is timed up to MAX_REPEATS times while its total stays under REPEAT_SECONDS, and reports
# the fastest time, so that short rows are not dominated by one slow call.
MAX_REPEATS = 3
REPEAT_SECONDS = 10.0

UsageError = needle.UsageError


# ---------------------------------------------------------------------------------------------
# FLOP counts and the matmul peak


def linear_params_per_layer(a):
    """Return the weight count of one layer's matmuls: q, k, v, o and the three MLP projections."""
    attention = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
    return attention + 3 * a.dim * a.hidden_dim


def linear_flops(a, n_tokens, logits_positions=1):
    """Return the FLOPs of the weight matmuls of one forward of n_tokens, lm_head included."""
    return 2 * n_tokens * a.n_layers * linear_params_per_layer(a) + 2 * a.dim * a.vocab_size * logits_positions


def attention_flops(a, n_tokens, start=0):
    """Return the attention FLOPs of n_tokens queries at positions start.. under the causal mask.

    A query at position p attends to p + 1 keys: 2 * head_dim FLOPs per key for q.k and as many for
    the weighted sum of values, in every query head.
    """
    keys_attended = n_tokens * start + n_tokens * (n_tokens + 1) // 2
    return 4 * a.head_dim * a.n_heads * a.n_layers * keys_attended


def forward_flops(a, n_tokens, start=0):
    """Return the matmul FLOPs of one forward over a cache of `start` tokens. Norms, RoPE, softmax and SiLU are left out."""
    return linear_flops(a, n_tokens) + attention_flops(a, n_tokens, start)


def linear_peak(dtype, device, size=2048, seconds=1.0):
    """Return the GFLOP/s of F.linear on (size, size) operands, repeated for about `seconds`."""
    x = torch.randn(size, size, device=device).to(dtype)
    w = torch.randn(size, size, device=device).to(dtype)
    F.linear(x, w)
    synchronize(device)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        F.linear(x, w)
        synchronize(device)
        reps += 1
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e9


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Memory


def reset_peak(device):
    """Start a new peak-memory window. Where /proc/self/clear_refs is missing, the CPU peak stays the process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # On Linux, writing 5 resets the peak RSS (VmHWM) to the current RSS.
    except OSError:
        pass


def proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the file reports kB
    return None


def current_bytes(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return proc_status_bytes("VmRSS")


def peak_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM")


# ---------------------------------------------------------------------------------------------
# Timed runs. A prefill returns its seconds, a decode (seconds, new token ids).


def ours_oneshot(llm, ids, args):
    start = time.perf_counter()
    llm(ids, llm.new_cache(ids.shape[1]))  # allocating the cache is timed, as in the fold and in transformers
    synchronize(llm.device)
    return time.perf_counter() - start


def ours_fold(llm, ids, args):
    start = time.perf_counter()
    kvfold.fold(llm, ids, args.chunk_size)
    synchronize(llm.device)
    return time.perf_counter() - start


def hf_oneshot(hf, ids, args):
    start = time.perf_counter()
    hf(ids, logits_to_keep=1, use_cache=True)
    synchronize(ids.device)
    return time.perf_counter() - start


def hf_chunked(hf, ids, args):
    start = time.perf_counter()
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                prefill_chunk_size=args.chunk_size, pad_token_id=0)
    synchronize(ids.device)
    return time.perf_counter() - start


PREFILL = {"ours-oneshot": ours_oneshot, "ours-fold": ours_fold, "hf-oneshot": hf_oneshot, "hf-chunked": hf_chunked}


def ours_decode(llm, ids, n_new, args):
    """Fold ids (untimed), then time n_new greedy steps; return (seconds, new tokens)."""
    cache = llm.new_cache(ids.shape[1] + n_new)
    cache, logits = kvfold.fold(llm, ids, args.chunk_size, cache=cache)
    synchronize(llm.device)
    start = time.perf_counter()
    tokens = kvfold.greedy(llm, cache, logits, n_new + 1)  # the first token comes from the fold's logits
    synchronize(llm.device)
    return time.perf_counter() - start, tokens[1:]


def hf_decode(hf, ids, n_new, args):
    """Prefill ids with transformers (untimed), then time n_new greedy steps; return (seconds, new tokens)."""
    out = hf(ids, logits_to_keep=1, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = []
    synchronize(ids.device)
    start = time.perf_counter()
    for _ in range(n_new):
        out = hf(token, cache=out.cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    synchronize(ids.device)
    return time.perf_counter() - start, tokens


# ---------------------------------------------------------------------------------------------
# Models


def load_ours(args, dtype, device):
    if args.random_config:
        a = llama.ModelArgs.from_config(args.random_config_json, source=args.random_config)
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # allocate in the target dtype: an fp32 model first would need twice the memory
        try:
            llm = llama.Transformer(a, device=device)
        finally:
            torch.set_default_dtype(default)
        for p in llm.parameters():
            p.data.normal_(0, 0.02)
        return llm.eval()
    return llama.load(args.checkpoint, device=device, dtype=dtype)


def load_hf(args, dtype, device):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.random_config:
        fields = dict(args.random_config_json)
        config = transformers.AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)  # the same file as ours
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(device)
    hf.generation_config.pad_token_id = hf.generation_config.pad_token_id or 0
    return hf.eval()


def prompt_ids(tokenizer, n_tokens, vocab_size):
    """Return n_tokens ids: the generated needle haystack, or random ids for a random model."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(n_tokens)
        return torch.randint(vocab_size, (n_tokens,), generator=generator).tolist()
    return drift.text_tokens(tokenizer, n_tokens)


# ---------------------------------------------------------------------------------------------
# The run


def measure_row(args, method, dtype_name, ids):
    """Load the model, warm it up, then time one row in this process.

    Returns (fastest seconds, peak bytes, bytes before the model was loaded, decoded token ids or None).
    """
    device = torch.device(args.device)
    gc.collect()
    baseline = current_bytes(device)
    impl, kind = method.split("-")
    runner = (load_ours if impl == "ours" else load_hf)(args, DTYPES[dtype_name], device)
    ids = torch.tensor([ids], device=device)
    decoded = None
    with torch.inference_mode():
        PREFILL[f"{impl}-oneshot"](runner, ids[:, :16], args)  # warm-up, untimed
        reset_peak(device)
        times = []
        while len(times) < MAX_REPEATS and sum(times) < REPEAT_SECONDS:
            if kind == "decode":
                decode = ours_decode if impl == "ours" else hf_decode
                seconds, decoded = decode(runner, ids, args.decode_tokens, args)
            else:
                seconds = PREFILL[method](runner, ids, args)
            times.append(seconds)
        peak = peak_bytes(device)
    return min(times), peak, baseline, decoded


def measure_in_new_process(*job):
    """Run measure_row in a fresh Python process, so that no earlier row's memory counts in its peak."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_row, job)


def run_rows(args, a, tokenizer, peaks, log):
    """Measure every (dtype, implementation, length) and yield one row dict per measurement."""
    prompts = {}

    def ids_for(n):
        if n not in prompts:
            prompts[n] = prompt_ids(tokenizer, n, a.vocab_size)
        return prompts[n]

    measure = measure_row if args.one_process else measure_in_new_process
    implementations = [impl for impl in ("ours", "hf") if any(m.startswith(impl) for m in args.methods)]
    for dtype_name in args.dtypes:
        dtype_bytes = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
        for impl in implementations:
            for n in args.lengths:
                for method in (m for m in args.methods if m.startswith(impl)):
                    seconds, peak, baseline, _ = measure(args, method, dtype_name, ids_for(n))
                    yield row(a, method, dtype_name, n, seconds, forward_flops(a, n), peaks[dtype_name],
                              peak, baseline, dtype_bytes, log)
            if args.decode_tokens:
                seconds, peak, baseline, decoded = measure(args, f"{impl}-decode", dtype_name, ids_for(args.decode_from))
                flops = sum(forward_flops(a, 1, start=args.decode_from + i) for i in range(args.decode_tokens))
                r = row(a, f"{impl}-decode", dtype_name, args.decode_tokens, seconds, flops, peaks[dtype_name],
                        peak, baseline, dtype_bytes, log, cache_tokens=args.decode_from + args.decode_tokens)
                r["decoded"] = decoded
                yield r


def row(a, method, dtype_name, n_tokens, seconds, flops, peak_gflops, peak, baseline, dtype_bytes, log, cache_tokens=None):
    weights = memory.count_parameters(a) * dtype_bytes
    cache = 2 * a.n_layers * a.n_kv_heads * a.head_dim * (cache_tokens or n_tokens) * dtype_bytes
    r = {"method": method, "dtype": dtype_name, "tokens": n_tokens, "seconds": seconds,
         "tokens_per_s": n_tokens / seconds, "gflops_per_s": flops / seconds / 1e9,
         "fraction_of_peak": flops / seconds / 1e9 / peak_gflops,
         "peak_bytes": peak, "above_baseline_bytes": None if peak is None or baseline is None else peak - baseline,
         "weights_bytes": weights, "cache_bytes": cache}
    log(f"  {method:<13} {dtype_name} {n_tokens:>6} tokens: {r['tokens_per_s']:8.1f} tokens/s, "
        f"{r['gflops_per_s']:6.1f} GFLOP/s, peak {mib(peak)} MiB")
    return r


def mib(n):
    return "-" if n is None else f"{n / 2 ** 20:.0f}"


def ratio(rows, num, den, dtype, tokens):
    """Return the tokens/s of method num over method den at (dtype, tokens), or None if either is missing."""
    found = {r["method"]: r["tokens_per_s"] for r in rows if r["dtype"] == dtype and r["tokens"] == tokens}
    if num in found and den in found:
        return found[num] / found[den]
    return None


def targets(rows, args):
    """Return the performance targets as dicts: name, measured value, limit, met."""
    checks = []

    def check(name, value, limit, at_least=True):
        if value is not None:
            checks.append({"target": name, "value": value, "limit": limit,
                           "met": value >= limit if at_least else value <= limit})

    for dtype in args.dtypes:
        for n in args.lengths:
            check(f"{dtype} {n}: ours-fold / hf-oneshot tokens/s", ratio(rows, "ours-fold", "hf-oneshot", dtype, n),
                  1.5 if dtype == "bf16" else 1.0)
            check(f"{dtype} {n}: ours-oneshot / hf-oneshot tokens/s", ratio(rows, "ours-oneshot", "hf-oneshot", dtype, n), 1.0)
            slowdown = ratio(rows, "ours-oneshot", "ours-fold", dtype, n)
            check(f"{dtype} {n}: ours-fold time / ours-oneshot time", slowdown, 1.1, at_least=False)
            for r in rows:
                if args.one_process:  # peaks then include earlier rows' memory, so they prove nothing
                    break
                if r["method"] == "ours-fold" and r["dtype"] == dtype and r["tokens"] == n and r["above_baseline_bytes"]:
                    check(f"{dtype} {n}: ours-fold memory / (weights + cache)",
                          r["above_baseline_bytes"] / (r["weights_bytes"] + r["cache_bytes"]), 1.1, at_least=False)
        check(f"{dtype}: ours-decode / hf-decode tokens/s", ratio(rows, "ours-decode", "hf-decode", dtype, args.decode_tokens), 1.0)
    return checks


def print_report(rows, checks, out=None):
    out = out or sys.stdout
    print(f"{'method':<13} {'dtype':<5} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'peak MiB':>9} {'+model MiB':>10} {'w+cache MiB':>11}", file=out)
    for r in rows:
        print(f"{r['method']:<13} {r['dtype']:<5} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['gflops_per_s']:>8.1f} {r['fraction_of_peak']:>8.1%} {mib(r['peak_bytes']):>9} "
              f"{mib(r['above_baseline_bytes']):>10} {mib(r['weights_bytes'] + r['cache_bytes']):>11}", file=out)
    if checks:
        print("\ntargets:", file=out)
    for c in checks:
        sign = ">=" if "memory" not in c["target"] and "time" not in c["target"] else "<="
        print(f"  {'met ' if c['met'] else 'MISS'} {c['target']}: {c['value']:.2f} (target {sign} {c['limit']})", file=out)


def transformers_version():
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = needle.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--random-config", metavar="CONFIG_JSON",
                        help="use random weights of this config.json's shape instead of a checkpoint (prompts are random ids)")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="prompt lengths in tokens, 1k = 1024 (default: %(default)s)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)} (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated prefill methods; each implementation named here also decodes "
                             "unless --decode-tokens 0 (default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=256, help="fold and chunked-prefill chunk in tokens (default: %(default)s)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens to time, 0 to skip decoding (default: %(default)s)")
    parser.add_argument("--decode-from", type=int, default=4096, help="prompt length in tokens before decoding (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--allow-long", action="store_true",
                        help="allow lengths beyond the model's max_position_embeddings, where RoPE was not trained")
    parser.add_argument("--one-process", action="store_true",
                        help="measure every row in this process: faster, but a row's peak memory may include earlier rows' freed memory")
    parser.add_argument("--json", default="results/bench.json", help="write rows and targets here (default: %(default)s)")
    args = parser.parse_args(argv)

    args.lengths = needle.parse_list(args.lengths, needle.parse_length, "lengths", "1024,4096")
    args.dtypes = needle.parse_list(args.dtypes, str, "dtypes", "fp32,bf16")
    args.methods = needle.parse_list(args.methods, str, "methods", "ours-fold,hf-oneshot")
    for name, values, known in (("dtypes", args.dtypes, DTYPES), ("methods", args.methods, METHODS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise UsageError(f"unknown {unknown[0]!r} in --{name}; choose from {', '.join(known)}")
    if min(args.lengths) < 1:
        raise UsageError(f"--lengths must be positive, got {min(args.lengths)}")
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    if args.decode_tokens < 0 or args.decode_from < 1:
        raise UsageError("--decode-tokens must be at least 0 and --decode-from at least 1")
    needle.check_device(args.device, args.dtypes, "--dtypes")
    if args.checkpoint and args.random_config:
        raise UsageError("give either --checkpoint or --random-config, not both")
    return args


def read_random_config(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--random-config {path} not found; give the path of a config.json") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--random-config {path} is not valid JSON ({e}); give a Hugging Face config.json") from None


def main(argv=None):
    args = parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    device = torch.device(args.device)
    tokenizer = None
    if args.random_config:
        args.random_config_json = read_random_config(args.random_config)
        a = llama.ModelArgs.from_config(args.random_config_json, source=args.random_config)
    else:
        if args.checkpoint is None:
            args.checkpoint = needle.builtin_checkpoint()
        a = llama.read_config(args.checkpoint)
        llama.check_weights(args.checkpoint, a)  # here, not in the processes that measure the rows
        tokenizer = tok.load(args.checkpoint)
    longest = max(args.lengths + [args.decode_from + args.decode_tokens] if args.decode_tokens else args.lengths)
    needle.check_length(longest, a.max_seq_len, args.allow_long, f"a prompt of {longest} tokens")
    if any(m.startswith("hf") for m in args.methods):
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError("the hf-* methods need transformers: pip install transformers, "
                             "or pass --methods ours-oneshot,ours-fold") from None
    needle.check_output_path(args.json, "--json")

    log(f"machine: {machine(device)}")
    measured = {}  # GFLOP/s of F.linear in each dtype's own kernel
    for dtype_name in args.dtypes:
        measured[dtype_name] = linear_peak(DTYPES[dtype_name], device)
        log(f"F.linear {dtype_name} peak (2048 x 2048): {measured[dtype_name]:.1f} GFLOP/s")
    peaks = dict(measured)  # the limit each dtype's rows are divided by
    if device.type == "cpu" and llama.Linear.upcast_half_on_cpu:
        # Our half-precision linears run the fp32 kernel here, so fp32's peak is their limit.
        fp32_peak = measured["fp32"] if "fp32" in measured else linear_peak(torch.float32, device)
        for dtype_name in peaks:
            peaks[dtype_name] = max(peaks[dtype_name], fp32_peak)
        log(f"this CPU has no bf16 matrix units: our bf16 and fp16 linears run in fp32 (see model.Linear), "
            f"so the fp32 peak {fp32_peak:.1f} GFLOP/s is the limit of every row")

    rows = []
    try:
        for r in run_rows(args, a, tokenizer, peaks, log):
            rows.append(r)
    except KeyboardInterrupt:
        log(f"\ninterrupted after {len(rows)} rows; writing what was measured")
    checks = targets(rows, args)
    print_report(rows, checks)
    result = {"machine": machine(device), "device": args.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers_version(),
              "linear_gflops_measured": measured, "peak_gflops_used": peaks, "args": {k: v for k, v in vars(args).items() if k != "random_config_json"},
              "rows": rows, "targets": checks}
    try:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    except OSError as e:
        raise UsageError(f"cannot write {args.json}: {e.strerror}") from None
    log(f"results: {args.json}")


def run():
    needle.run_command(main, "bench.py", "interrupted before any measurement")


if __name__ == "__main__":
    run()
