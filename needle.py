"""Needle-in-a-haystack retrieval with KV-Fold.

A pass key (a random number) is hidden at a chosen depth inside generated filler text. The
prompt is folded into the KV cache chunk by chunk, then the model continues greedily. A trial is
correct when the pass key appears in the generated answer.

    python needle.py                      # built-in SmolLM2-135M-Instruct on CPU, 1K to 7.5K tokens
    python needle.py --checkpoint DIR --device cuda --dtype bf16 --lengths 16k,32k,64k,128k
"""

import argparse
import json
import os
import random
import sys
import time

import torch

import kvfold
import model as llama
import tokenizer as tok

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

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


def haystack_sentences(rng):
    """Yield filler sentences forever."""
    while True:
        yield f" {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(TIMES)} {rng.choice(TAILS)}"


def build_prompt(tokenizer, length, depth, key, rng):
    """Return (token ids, needle start index) for a prompt of exactly `length` tokens.

    Layout: BOS, intro, haystack with the needle at a sentence boundary near `depth` (a fraction
    of the haystack's tokens), question, answer prefix. The haystack is cut at the token that
    makes the total exactly `length`, so only its last sentence may be partial.
    """
    head = tokenizer.encode(INTRO, bos=tokenizer.add_bos)
    needle = tokenizer.encode(" " + NEEDLE.format(key=key))
    tail = tokenizer.encode(QUESTION)
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise ValueError(f"length {length} is too short: the prompt without filler already has {length - budget} tokens")

    filler, boundaries = [], [0]  # boundaries: token offsets where a filler sentence starts
    for sentence in haystack_sentences(rng):
        if len(filler) >= budget:
            break
        filler += tokenizer.encode(sentence)
        boundaries.append(len(filler))
    filler = filler[:budget]
    boundaries = [b for b in boundaries if b <= budget]
    at = min(boundaries, key=lambda b: abs(b - depth * budget))
    ids = head + filler[:at] + needle + filler[at:] + tail
    return ids, len(head) + at


def parse_length(text):
    """Parse '7500', '16k' or '128K' into tokens (k = 1024)."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_list(text, parse, name):
    try:
        return [parse(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"needle.py: error: invalid {name} {text!r}; give comma-separated values, e.g. --{name} 1k,4k")


def run_trial(model, tokenizer, length, depth, trial, args):
    rng = random.Random(f"{args.seed}-{length}-{depth}-{trial}")
    key = str(rng.randint(10000, 99999))
    ids, needle_at = build_prompt(tokenizer, length, depth, key, rng)

    start = time.perf_counter()
    cache = model.new_cache(len(ids) + args.max_new_tokens)
    cache, logits = kvfold.fold(model, ids, args.chunk_size, cache)
    answer_ids = kvfold.greedy(model, cache, logits, args.max_new_tokens, stop_ids=tokenizer.stop_ids)
    seconds = time.perf_counter() - start
    answer = tokenizer.decode([t for t in answer_ids if t not in tokenizer.stop_ids])
    return {
        "method": "fold",
        "length": length,
        "prompt_tokens": len(ids),
        "depth": depth,
        "needle_position": needle_at,
        "trial": trial,
        "seed": args.seed,
        "chunk_size": args.chunk_size,
        "chain_depth": kvfold.num_steps(len(ids), args.chunk_size) - 1,
        "expected": key,
        "answer": answer,
        "correct": key in answer,
        "seconds": round(seconds, 3),
    }


def print_table(results, lengths, depths, out=sys.stdout):
    """Print accuracy by length (rows) and depth (columns)."""
    print("\naccuracy (correct / trials) by prompt length and needle depth", file=out)
    print("length  " + "".join(f"{d:>8.2f}" for d in depths) + "     all", file=out)
    for length in lengths:
        row = [r for r in results if r["length"] == length]
        cells = []
        for depth in depths:
            cell = [r["correct"] for r in row if r["depth"] == depth]
            cells.append(f"{sum(cell)}/{len(cell)}" if cell else "-")
        print(f"{length:<8}" + "".join(f"{c:>8}" for c in cells) + f"{sum(r['correct'] for r in row):>6}/{len(row)}", file=out)
    total = sum(r["correct"] for r in results)
    print(f"\nretrieved {total} of {len(results)} needles ({100 * total / max(len(results), 1):.0f}%)", file=out)


def main():
    parser = argparse.ArgumentParser(description="Needle-in-a-haystack retrieval with KV-Fold.")
    parser.add_argument("--checkpoint", help="Hugging Face Llama folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--lengths", default="1000,2500,5000,7500", help="prompt lengths in tokens, e.g. 4k,16k (default: %(default)s)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths as fractions of the filler (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=1, help="trials per length and depth (default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per fold step (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights and cache dtype (default: bf16 on cuda, fp32 on cpu, where bf16 is slower here)")
    parser.add_argument("--seed", type=int, default=0, help="seed for pass keys and filler (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer length limit (default: %(default)s)")
    parser.add_argument("--json", help="write every trial's result to this JSON file")
    args = parser.parse_args()

    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    lengths = parse_list(args.lengths, parse_length, "lengths")
    depths = parse_list(args.depths, float, "depths")
    if not lengths or min(lengths) <= 0:
        parser.error(f"--lengths must be positive, got {args.lengths!r}")
    if not depths or not all(0 <= d <= 1 for d in depths):
        parser.error(f"--depths must lie in [0, 1], got {args.depths!r}")
    if args.trials < 1 or args.chunk_size < 1 or args.max_new_tokens < 1:
        parser.error("--trials, --chunk-size and --max-new-tokens must be positive")

    try:
        if args.checkpoint is None:
            import prepare

            args.checkpoint = prepare.ensure_builtin(log=lambda m: print(m, file=sys.stderr))
        start = time.perf_counter()
        model = llama.load(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype])
        tokenizer = tok.load(args.checkpoint)
    except (llama.CheckpointError, tok.TokenizerError) as e:
        sys.exit(f"needle.py: error: {e}")
    if max(lengths) > model.args.max_seq_len:
        parser.error(f"--lengths: {max(lengths)} exceeds the model's {model.args.max_seq_len} trained positions")
    print(f"loaded {args.checkpoint} ({args.dtype}, {args.device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    grid = [(n, d, t) for n in lengths for d in depths for t in range(args.trials)]
    results = []
    for i, (length, depth, trial) in enumerate(grid, 1):
        r = run_trial(model, tokenizer, length, depth, trial, args)
        results.append(r)
        mark = "ok" if r["correct"] else "MISS"
        print(f"[{i}/{len(grid)}] length {r['prompt_tokens']} depth {depth:.2f} chain depth {r['chain_depth']}: "
              f"expected {r['expected']}, answered {r['answer'].strip()!r} {mark} ({r['seconds']:.1f} s)",
              file=sys.stderr, flush=True)

    print_table(results, lengths, depths)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": os.path.abspath(args.checkpoint), "dtype": args.dtype, "device": args.device,
                       "results": results}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
