"""Needle-in-a-haystack retrieval: KV-Fold against one-shot prefill and a streaming baseline.

A pass key (a random number) is hidden at a chosen depth inside filler text. The same prompt is
then read three ways:
- fold: KV-Fold, chunk_size tokens per step, every key and value kept;
- oneshot: the whole prompt in one forward pass;
- streaming: StreamingLLM, keeping only the first `sinks` and the last `window` tokens.
The model continues greedily, and a trial is correct when the pass key appears in its output.

Each finished trial is appended to a JSON Lines file at once (--json), and a rerun with the same
file skips the trials it already holds, so a long run that stops midway continues where it
stopped.

    python needle.py                      # built-in SmolLM2-135M-Instruct on CPU, 1K to 7.5K tokens
    python needle.py --checkpoint DIR --preset paper --json results/paper.jsonl --plot paper.png
"""

import argparse
import contextlib
import json
import os
import random
import re
import resource
import signal
import sys
import time

import torch

import kvfold
import memory
import model as llama
import streaming
import tokenizer as tok

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("fold", "oneshot", "streaming")

# KV-Fold (arXiv 2605.12471) reports 152 trials from 16K to 128K tokens with chunk 256 on
# Llama-3.1-8B, without the grid. This one covers that envelope: 8 lengths x 19 depths (0 to 1 in steps of 1/18) x 1.
PRESETS = {
    "paper": {
        "lengths": "16k,32k,48k,64k,80k,96k,112k,128k",
        "depths": ",".join(f"{i / 18:.4f}" for i in range(19)),
        "trials": 1,
        "chunk_size": 256,
        "methods": "fold",
        "dtype": "bf16",
    },
}

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

# Filler text: sentences drawn from these templates with a seeded generator, so runs with the
# same seed build the same haystack and nothing has to be downloaded.
SUBJECTS = ["The old harbour", "A quiet village", "The northern road", "The market square", "A small farm",
            "The river", "The library", "An empty station", "The mill by the bridge", "The hill above town"]
VERBS = ["was busy", "stood still", "looked grey", "smelled of rain", "was crowded", "grew quiet",
         "filled with light", "was covered in snow", "echoed with voices", "lay in shadow"]
TIMES = ["in the early morning", "after the storm", "during the long summer", "before the winter fair",
         "at noon", "on most evenings", "late in the autumn", "when the bells rang", "every second week",
         "under a pale sky"]
TAILS = ["and nobody seemed to mind.", "while the carts rolled past.", "as the ferry left the shore.",
         "and the baker opened his door.", "while children played near the wall.",
         "and the wind turned to the east.", "as the lamps were lit one by one.",
         "and a dog barked somewhere far away.", "while the clerk counted the sacks.",
         "and the fields turned slowly golden."]


class UsageError(Exception):
    """Invalid arguments or input files; run() prints the message and exits with status 2."""


# ---------------------------------------------------------------------------------------------
# Input checks shared by the command-line scripts


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser that reports an invalid argument in one line, without the usage text, and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def read_text_file(path, label):
    """Return the contents of a UTF-8 text file; raise UsageError if it is missing, unreadable, not UTF-8 or blank.

    label names the file in messages, e.g. "haystack file".
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"{label} {path} not found; check the path") from None
    except IsADirectoryError:
        raise UsageError(f"{label} {path} is a folder; give a text file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{label} {path} is not UTF-8 text (invalid byte at offset {e.start}); convert it, e.g. with iconv -t UTF-8") from None
    except OSError as e:
        raise UsageError(f"cannot read {label} {path}: {e.strerror}") from None
    if not text.strip():
        raise UsageError(f"{label} {path} contains no text; give a file with text in it")
    return text


def check_device(name, dtype_names, dtype_flag="--dtype"):
    """Return torch.device(name) after checking that it exists and runs every dtype in dtype_names; raise UsageError if not.

    CPUs run fp64, fp32, bf16 and fp16. On CUDA, bf16 needs torch.cuda.is_bf16_supported().
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name} was requested but torch sees no CUDA device; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: torch sees {count} CUDA devices; use cuda:0 to cuda:{count - 1}")
    if "bf16" in dtype_names:
        if device.index is None:
            supported = torch.cuda.is_bf16_supported()
        else:
            with torch.cuda.device(device.index):  # is_bf16_supported() checks the current device
                supported = torch.cuda.is_bf16_supported()
        if not supported:
            raise UsageError(f"{dtype_flag} bf16: {name} does not support bf16; use fp16 or fp32")
    return device


def check_length(tokens, max_positions, allow_long, subject):
    """Raise UsageError when tokens exceed the model's trained positions, or only warn when allow_long is set.

    subject starts the message, e.g. "--lengths 16384". Past max_position_embeddings RoPE meets
    positions it was never trained on, so results there may be wrong.
    """
    if tokens <= max_positions:
        return
    message = f"{subject} exceeds the model's {max_positions} trained positions (max_position_embeddings)"
    if not allow_long:
        raise UsageError(f"{message}; use fewer tokens, or pass --allow-long to run past them")
    print(f"warning: {message}; RoPE was not trained there, so expect worse results (--allow-long)", file=sys.stderr)


def builtin_checkpoint():
    """Return the built-in checkpoint folder, converting it on first use; raise CheckpointError if that fails."""
    import prepare

    try:
        return prepare.ensure_builtin(log=lambda m: print(m, file=sys.stderr))
    except prepare.PrepareError as e:
        raise llama.CheckpointError(f"cannot prepare the built-in checkpoint: {e}") from None


def check_output_path(path, flag, create_folder=True):
    """Check that an output file can be written, before any heavy work; create its folder if create_folder is set.

    The check opens the file for appending, which leaves an existing file unchanged, and removes
    the file again if the check created it.
    """
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if create_folder:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            reason = "a file of that name exists" if os.path.isfile(folder) else e.strerror
            raise UsageError(f"{flag} {path}: cannot create folder {folder}: {reason}; choose another path") from None
    elif not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} is missing or not writable; create it or choose another path")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be written: {e.strerror}; choose another path") from None
    if not existed:
        os.remove(path)


def check_fits(needed, available, device, fix):
    """Compare a memory plan of needed bytes with the available bytes of device (None if unknown).

    Raises UsageError ending in fix when the plan does not fit on CUDA. On CPU it only warns,
    since the run may still finish by swapping.
    """
    if available is None or needed <= available:
        return
    message = f"the plan needs {needed / 1024 ** 3:.2f} GiB but {device} has {available / 1024 ** 3:.2f} GiB available"
    if device.type == "cuda":
        raise UsageError(f"{message}; {fix}")
    print(f"warning: {message}; the run may swap or fail", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Prompts


def read_haystack(path):
    """Return the sentences of a UTF-8 text file, each with one leading space."""
    text = read_text_file(path, "haystack file")
    return [" " + " ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def haystack_sentences(rng, sentences=None):
    """Yield filler sentences forever: from `sentences` in a loop from a random start, else generated."""
    if sentences:
        i = rng.randrange(len(sentences))
        while True:
            yield sentences[i % len(sentences)]
            i += 1
    while True:
        yield f" {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(TIMES)} {rng.choice(TAILS)}"


def build_prompt(tokenizer, length, depth, key, rng, sentences=None):
    """Return (token ids, needle start index) for a prompt of exactly `length` tokens.

    Layout: BOS if the checkpoint's tokenizer adds one, intro, filler with the needle at the
    sentence boundary nearest to `depth` (a fraction of the filler's tokens), question, answer
    prefix. The filler is cut at the token that makes the total exactly `length`, so only its
    last sentence may be partial. Special tokens are removed from the filler, so a haystack file
    that contains, say, "<|begin_of_text|>" adds no second BOS.
    """
    head = tokenizer.encode(INTRO, bos=tokenizer.add_bos)
    needle = tokenizer.encode(" " + NEEDLE.format(key=key))
    tail = tokenizer.encode(QUESTION)
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise UsageError(f"length {length} is too short: the prompt without filler already has {length - budget} tokens")

    special = set(tokenizer.special_tokens.values())
    filler, boundaries = [], [0]  # boundaries: token offsets where a filler sentence starts
    for sentence in haystack_sentences(rng, sentences):
        if len(filler) >= budget:
            break
        filler += [t for t in tokenizer.encode(sentence) if t not in special]
        boundaries.append(len(filler))
    filler = filler[:budget]
    boundaries = [b for b in boundaries if b <= budget]
    at = min(boundaries, key=lambda b: abs(b - depth * budget))
    ids = head + filler[:at] + needle + filler[at:] + tail
    return ids, len(head) + at


# ---------------------------------------------------------------------------------------------
# Methods: each reads the prompt and returns (greedy answer ids, chain depth).


def answer_fold(model, ids, args, stop_ids):
    cache = model.new_cache(len(ids) + args.max_new_tokens)
    cache, logits = kvfold.fold(model, ids, args.chunk_size, cache)
    return kvfold.greedy(model, cache, logits, args.max_new_tokens, stop_ids), kvfold.num_steps(len(ids), args.chunk_size) - 1


def answer_oneshot(model, ids, args, stop_ids):
    cache = model.new_cache(len(ids) + args.max_new_tokens)
    cache, logits = kvfold.fold(model, ids, len(ids), cache)
    return kvfold.greedy(model, cache, logits, args.max_new_tokens, stop_ids), 0


def answer_streaming(model, ids, args, stop_ids):
    cache, logits = streaming.stream(model, ids, args.chunk_size, args.sinks, args.window, extra=args.max_new_tokens)
    answer = streaming.greedy(model, cache, logits, args.max_new_tokens, stop_ids, args.sinks, args.window)
    return answer, kvfold.num_steps(len(ids), args.chunk_size) - 1


ANSWER = {"fold": answer_fold, "oneshot": answer_oneshot, "streaming": answer_streaming}


def trial_prompt(tokenizer, length, depth, trial, args, sentences):
    """Return (ids, needle position, pass key); the same for every method of a trial."""
    rng = random.Random(f"{args.seed}-{length}-{depth}-{trial}")
    key = str(rng.randint(10000, 99999))
    ids, needle_at = build_prompt(tokenizer, length, depth, key, rng, sentences)
    return ids, needle_at, key


def run_trial(model, tokenizer, method, prompt, args):
    ids, needle_at, key = prompt
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    start = time.perf_counter()
    answer_ids, chain_depth = ANSWER[method](model, ids, args, tokenizer.stop_ids)
    seconds = time.perf_counter() - start
    answer = tokenizer.decode([t for t in answer_ids if t not in tokenizer.stop_ids])
    return {
        "needle_position": needle_at,
        "prompt_tokens": len(ids),
        "chain_depth": chain_depth,
        "expected": key,
        "answer": answer,
        "correct": key in answer,
        "seconds": round(seconds, 3),
        "peak_memory_bytes": peak_memory_bytes(model.device),
    }


def peak_memory_bytes(device):
    """Peak memory of this trial on CUDA (max allocated); on CPU, the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Results file: one JSON object per line, appended and flushed after every trial.

KEY_FIELDS = ("method", "model", "dtype", "length", "depth", "trial", "seed", "chunk_size", "sinks", "window", "haystack")
REPORT_FIELDS = ("method", "length", "depth", "trial", "answer", "correct")  # what print_tables reads


def trial_key(record):
    return tuple(record.get(name) for name in KEY_FIELDS)


def load_results(path):
    """Return the records of a results file; a malformed line (from a killed run) is skipped with a warning."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                print(f"warning: {path}:{n} is not valid JSON (a run killed mid-write?); that trial runs again", file=sys.stderr)
                continue
            if not isinstance(record, dict) or any(name not in record for name in REPORT_FIELDS):
                print(f"warning: {path}:{n} is not a needle.py trial record; skipped", file=sys.stderr)
                continue
            records.append(record)
    return records


def open_results(path):
    """Open a results file for appending, ending a last line that a killed run left unfinished."""
    f = open(path, "a", encoding="utf-8")
    if f.tell() > 0:
        with open(path, "rb") as raw:
            raw.seek(-1, os.SEEK_END)
            if raw.read(1) != b"\n":
                f.write("\n")
    return f


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt if it came.

    A Python handler is swapped in, rather than blocking the signal, because the kernel may deliver
    SIGINT to one of torch's worker threads, where a blocked main thread does not stop it.
    """
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def append_result(f, record):
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Memory plan


def print_plan(a, args, max_tokens, device, loaded_weights=False):
    """Print the memory plan of each method; return the largest total in bytes."""
    gib = 1024 ** 3
    dtype_bytes = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    print(f"memory plan ({args.dtype}, {max_tokens} tokens, chunk {args.chunk_size}):", file=sys.stderr)
    largest = 0
    for method in args.methods:
        plan = memory.plan(a, method, max_tokens, args.chunk_size, dtype_bytes, args.sinks, args.window)
        total = sum(plan.values())
        largest = max(largest, total)
        print(f"  {method:<10} weights {plan['weights'] / gib:6.2f} GiB + cache {plan['cache'] / gib:6.2f} GiB"
              f" + scratch {plan['scratch'] / gib:6.2f} GiB = {total / gib:6.2f} GiB", file=sys.stderr)
    free = memory.free_bytes(device) if device is not None else None
    if free is not None:
        # Loaded weights already take part of the device's memory.
        available = free + (plan["weights"] if loaded_weights else 0)
        print(f"  available on {device}: {available / gib:.2f} GiB", file=sys.stderr)
        check_fits(largest, available, device,
                   "use shorter --lengths, fewer --methods (oneshot needs the most) or a smaller --chunk-size")
    return largest


# ---------------------------------------------------------------------------------------------
# Reports


def print_tables(results, lengths, depths, methods, out=sys.stdout):
    """Print accuracy by length (rows) and depth (columns) for each method."""
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        print(f"\n{method}: accuracy (correct / trials) by prompt length and needle depth", file=out)
        print("length  " + "".join(f"{d:>8.2f}" for d in depths) + "     all", file=out)
        for length in lengths:
            row = [r for r in rows if r["length"] == length]
            cells = []
            for depth in depths:
                cell = [r["correct"] for r in row if r["depth"] == depth]
                cells.append(f"{sum(cell)}/{len(cell)}" if cell else "-")
            print(f"{length:<8}" + "".join(f"{c:>8}" for c in cells) + f"{sum(r['correct'] for r in row):>6}/{len(row)}", file=out)
        total = sum(r["correct"] for r in rows)
        print(f"{method}: retrieved {total} of {len(rows)} needles ({100 * total / len(rows):.0f}%)", file=out)

    by_trial = {}
    for r in results:
        by_trial.setdefault((r["length"], r["depth"], r["trial"]), {})[r["method"]] = r["answer"]
    pairs = [t for t in by_trial.values() if "fold" in t and "oneshot" in t]
    if pairs:
        same = sum(t["fold"] == t["oneshot"] for t in pairs)
        print(f"\nfold and oneshot answered identically on {same} of {len(pairs)} trials", file=out)


def plot_heatmaps(results, lengths, depths, methods, path):
    """Write one accuracy heatmap per method: depth down the side, length along the bottom."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib; install it with: pip install matplotlib") from None
    import numpy as np

    methods = [m for m in methods if any(r["method"] == m for r in results)]
    fig, axes = plt.subplots(1, len(methods), figsize=(1 + 4 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                cell = [r["correct"] for r in results if r["method"] == method and r["length"] == length and r["depth"] == depth]
                if cell:
                    grid[i, j] = sum(cell) / len(cell)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(method)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_length(text):
    """Parse '7500', '16k' or '128K' into tokens (k = 1024)."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_list(text, parse, name, example):
    try:
        values = [parse(item) for item in text.split(",") if item.strip()]
    except (ValueError, OverflowError):
        raise UsageError(f"invalid --{name} {text!r}; give comma-separated values, e.g. --{name} {example}") from None
    if not values:
        raise UsageError(f"--{name} is empty")
    return values


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Needle-in-a-haystack retrieval: KV-Fold against one-shot prefill and StreamingLLM.")
    parser.add_argument("--checkpoint", help="Hugging Face Llama folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--preset", choices=PRESETS, help="paper: 16K to 128K tokens, chunk 256, 152 trials of fold")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--lengths", help="prompt lengths in tokens, k = 1024 (default: 1000,4000,7500)")
    parser.add_argument("--allow-long", action="store_true",
                        help="allow --lengths beyond the model's max_position_embeddings, where RoPE was not trained (prints a warning)")
    parser.add_argument("--depths", help="needle depths as fractions of the filler (default: 0,0.5,1)")
    parser.add_argument("--trials", type=int, help="trials per length and depth (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for pass keys and filler (default: %(default)s)")
    parser.add_argument("--haystack", help="UTF-8 text file to use as filler, repeated as needed (default: generated)")
    parser.add_argument("--chunk-size", type=int, help="tokens per fold or streaming step (default: 256)")
    parser.add_argument("--sinks", type=int, default=4, help="streaming: attention-sink tokens kept (default: %(default)s)")
    parser.add_argument("--window", type=int, default=1024, help="streaming: recent tokens kept (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights and cache dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer length limit in tokens (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="JSON Lines results file; a rerun with the same file resumes")
    parser.add_argument("--plot", metavar="PATH", help="write accuracy heatmaps (PNG) per method; needs matplotlib")
    parser.add_argument("--dry-run", action="store_true", help="print the memory plan and trial grid from config.json, then exit")
    args = parser.parse_args(argv)

    defaults = {"lengths": "1000,4000,7500", "depths": "0,0.5,1", "trials": 1, "chunk_size": 256,
                "methods": ",".join(METHODS), "dtype": "fp32" if args.device == "cpu" else "bf16"}
    defaults.update(PRESETS.get(args.preset, {}))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.lengths = parse_list(args.lengths, parse_length, "lengths", "1k,4k")
    args.depths = parse_list(args.depths, float, "depths", "0,0.5,1")
    args.methods = parse_list(args.methods, str.strip, "methods", "fold,streaming")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(METHODS)}")
    if min(args.lengths) <= 0:
        raise UsageError(f"--lengths must be positive, got {min(args.lengths)}")
    if not all(0 <= d <= 1 for d in args.depths):
        raise UsageError(f"--depths must lie in [0, 1], got {args.depths}")
    for name in ("trials", "chunk_size", "window", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.sinks < 0:
        raise UsageError(f"--sinks must be at least 0, got {args.sinks}")
    check_device(args.device, [args.dtype])
    return args


def min_prompt_tokens(tokenizer):
    """Return the token count of a prompt with no filler, the shortest length build_prompt accepts."""
    needle = NEEDLE.format(key="12345")
    return len(tokenizer.encode(INTRO, bos=tokenizer.add_bos) + tokenizer.encode(" " + needle) + tokenizer.encode(QUESTION))


def print_grid(args, model_args):
    n = len(args.lengths) * len(args.depths) * args.trials
    deepest = kvfold.num_steps(max(args.lengths), args.chunk_size) - 1
    print(f"trials: {len(args.lengths)} lengths x {len(args.depths)} depths x {args.trials} = {n} per method, "
          f"methods {', '.join(args.methods)}; chain depth up to {deepest} at chunk {args.chunk_size}", file=sys.stderr)
    print(f"  lengths {args.lengths}\n  depths {[round(d, 4) for d in args.depths]}", file=sys.stderr)
    if "streaming" in args.methods:
        print(f"  streaming keeps {args.sinks} sink tokens + the last {args.window} tokens", file=sys.stderr)
    longest = max(args.lengths)
    if longest <= model_args.max_seq_len < longest + args.max_new_tokens:
        print(f"warning: answers to {longest}-token prompts run past the model's {model_args.max_seq_len} trained "
              "positions, where RoPE was not trained", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    sentences = read_haystack(args.haystack) if args.haystack else None
    if args.checkpoint is None:
        args.checkpoint = builtin_checkpoint()
    model_args = llama.read_config(args.checkpoint)
    longest = max(args.lengths)
    check_length(longest, model_args.max_seq_len, args.allow_long, f"--lengths {longest}")
    device = torch.device(args.device)
    if args.dry_run:
        print_grid(args, model_args)
        print_plan(model_args, args, longest + args.max_new_tokens, device)
        return

    # Check everything that can fail before anything else is printed, the model loads and trials run.
    llama.check_weights(args.checkpoint, model_args)
    tokenizer = tok.load(args.checkpoint)
    shortest = min_prompt_tokens(tokenizer)
    if min(args.lengths) < shortest:
        raise UsageError(f"--lengths: {min(args.lengths)} is too short, the prompt needs at least {shortest} tokens")
    if args.plot:
        if os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
            raise UsageError(f"--plot {args.plot}: give a .png, .pdf or .svg file name")
        check_output_path(args.plot, "--plot")
    done = {}
    if args.json:
        check_output_path(args.json, "--json")
        done = {trial_key(r): r for r in load_results(args.json)}
    print_grid(args, model_args)
    print_plan(model_args, args, longest + args.max_new_tokens, device)

    start = time.perf_counter()
    model = llama.load(args.checkpoint, device=device, dtype=DTYPES[args.dtype])
    print(f"loaded {args.checkpoint} ({args.dtype}, {args.device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    results_file = None
    if args.json:
        try:
            results_file = open_results(args.json)
        except OSError as e:
            raise UsageError(f"cannot write results file {args.json}: {e.strerror}") from None

    identity = {"model": os.path.basename(os.path.abspath(args.checkpoint)), "dtype": args.dtype, "device": args.device,
                "seed": args.seed, "haystack": os.path.basename(args.haystack) if args.haystack else "generated"}
    grid = [(n, d, t, m) for n in args.lengths for d in args.depths for t in range(args.trials) for m in args.methods]
    results, skipped = [], 0
    prompt_key = prompt = None
    try:
        for i, (length, depth, trial, method) in enumerate(grid, 1):
            streaming_fields = {"sinks": args.sinks, "window": args.window} if method == "streaming" else {"sinks": None, "window": None}
            record = {"method": method, **identity, "length": length, "depth": depth, "trial": trial,
                      "chunk_size": None if method == "oneshot" else args.chunk_size, **streaming_fields}
            if trial_key(record) in done:
                results.append(done[trial_key(record)])
                skipped += 1
                continue
            if prompt_key != (length, depth, trial):  # the methods of a trial share one prompt
                prompt_key = (length, depth, trial)
                prompt = trial_prompt(tokenizer, length, depth, trial, args, sentences)
            record.update(run_trial(model, tokenizer, method, prompt, args))
            with interrupts_deferred():  # saved and counted together, so the Ctrl-C summary is exact
                if results_file:
                    append_result(results_file, record)
                results.append(record)
            mark = "ok" if record["correct"] else "MISS"
            print(f"[{i}/{len(grid)}] {method:<9} length {record['prompt_tokens']} depth {depth:.2f}: expected "
                  f"{record['expected']}, answered {record['answer'].strip()!r} {mark} ({record['seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        if args.json:
            saved = f"; {len(results) - skipped} new trials are saved in {args.json}, rerun the same command to continue"
        else:
            saved = "; nothing was saved, pass --json PATH to keep finished trials"
        print(f"\ninterrupted after {len(results)} of {len(grid)} trials{saved}", file=sys.stderr)
        print_tables(results, args.lengths, args.depths, args.methods)
        sys.exit(130)
    finally:
        if results_file:
            results_file.close()

    if skipped:
        print(f"reused {skipped} finished trials from {args.json}", file=sys.stderr)
    print_tables(results, args.lengths, args.depths, args.methods)
    if args.json:
        print(f"results: {args.json}", file=sys.stderr)
    if args.plot:
        plot_heatmaps(results, args.lengths, args.depths, args.methods, args.plot)
        print(f"heatmap: {args.plot}", file=sys.stderr)


def run_command(main, script, interrupted):
    """Run main(); print an input error as one line and exit with status 2, or on Ctrl-C print interrupted and exit with 130.

    main() reports an interrupt itself once it has results to save; interrupted covers the time before.
    """
    try:
        main()
    except (UsageError, llama.CheckpointError, tok.TokenizerError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)


def run():
    run_command(main, "needle.py", "interrupted before any trial ran")


if __name__ == "__main__":
    run()
