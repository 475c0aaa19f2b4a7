"""Fold a long document into a KV cache once, then answer questions about it from that cache.

The document part of the prompt is folded chunk by chunk (kvfold.fold). Each question is then
folded after it, and the answer is decoded greedily and streamed to stdout. Before the next
question, cache.length is set back to the document's end, so the next forward overwrites the
previous question and answer and the document is never folded twice.

    python ask.py --file REPORT.txt --question "Who signed the report?"
    python ask.py --file REPORT.txt --save-cache report.kv          # then questions from stdin
    python ask.py --file REPORT.txt --load-cache report.kv --question "When?"
"""

import argparse
import hashlib
import json
import os
import random
import sys
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import kvfold
import model as llama
import tokenizer as tok

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Prompt templates: (document part, question part). The document part is folded once and each
# question part is appended after it.
TEMPLATES = {
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{document}\n\n",
               "{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<|im_start|>user\n{document}\n\n", "{question}<|im_end|>\n<|im_start|>assistant\n"),
    "plain": ("{document}\n\n", "Question: {question}\nAnswer:"),
}
END_OF_TURN = ("<|eot_id|>", "<|im_end|>")

# Measured on the built-in SmolLM2-135M-Instruct (fp32, CPU, chunk 256, 24 new tokens): 2190 tokens
# of needle.py filler (seed 0) with 3 planted facts (a name, a time, a boat's name), one question
# each, greedy answers. Both formats found the name only, but plain returned an empty answer to the
# other two questions, while chat answered with a wrong but relevant sentence. Chat wins the tie.
AUTO_MEASUREMENT = "chat 1/3 facts right (2 wrong sentences), plain 1/3 (2 empty answers)"
AUTO_PREFERS_CHAT = True

# Room reserved after the document in interactive mode, where the questions are not known in
# advance. A longer question gets a larger cache (see ensure_room).
INTERACTIVE_QUESTION_TOKENS = 256


class UsageError(Exception):
    """Invalid arguments or input files; run() prints the message and exits with status 2."""


# ---------------------------------------------------------------------------------------------
# Prompts


def chat_template(tokenizer):
    """Return the chat template name the checkpoint's special tokens support, or None."""
    if "<|start_header_id|>" in tokenizer.special_tokens:
        return "llama3"
    if "<|im_start|>" in tokenizer.special_tokens:
        return "chatml"
    return None


def resolve_format(tokenizer, choice):
    """Return the template name for --format chat, plain or auto."""
    chat = chat_template(tokenizer)
    if choice == "plain":
        return "plain"
    if choice == "chat":
        if chat is None:
            raise UsageError("--format chat: the checkpoint has no <|start_header_id|> or <|im_start|> token; use --format plain")
        return chat
    return chat if chat is not None and AUTO_PREFERS_CHAT else "plain"


def document_ids(tokenizer, text, template):
    ids = tokenizer.encode(TEMPLATES[template][0].format(document=text))
    if template == "plain" and tokenizer.add_bos:
        ids = [tokenizer.bos_id] + ids
    return ids


def question_ids(tokenizer, question, template):
    return tokenizer.encode(TEMPLATES[template][1].format(question=question))


def stop_ids(tokenizer):
    ids = list(tokenizer.stop_ids)
    ids += [tokenizer.special_tokens[t] for t in END_OF_TURN if t in tokenizer.special_tokens]
    return list(dict.fromkeys(ids))


# ---------------------------------------------------------------------------------------------
# Folding and answering


def fold_document(model, ids, chunk_size, room, log=None):
    """Fold the document ids into a new cache with `room` free positions after them."""
    cache = model.new_cache(len(ids) + room)
    bytes_per_token = cache.nbytes() / cache.max_len
    start = time.perf_counter()

    def on_step(t, n, cache):
        if log is not None:
            seconds = time.perf_counter() - start
            log(f"folding: {cache.length}/{len(ids)} tokens, {cache.length / seconds:.0f} tokens/s, "
                f"cache {cache.length * bytes_per_token / 2**20:.1f} MiB")

    cache, _ = kvfold.fold(model, ids, chunk_size, cache=cache, on_step=on_step)
    return cache


def ensure_room(model, cache, doc_len, needed):
    """Return a cache holding the document with at least `needed` free positions after it."""
    if doc_len + needed <= cache.max_len:
        return cache
    bigger = model.new_cache(doc_len + needed)
    bigger.k[:, :, :, :doc_len] = cache.k[:, :, :, :doc_len]
    bigger.v[:, :, :, :doc_len] = cache.v[:, :, :, :doc_len]
    bigger.length = doc_len
    return bigger


def answer(model, cache, doc_len, q_ids, chunk_size, max_new_tokens, stops):
    """Yield the answer token ids to q_ids, folded after the document's doc_len cached positions.

    Setting cache.length back to doc_len drops any earlier question and answer: their slots are
    overwritten by this question's forward passes.
    """
    cache.length = doc_len
    cache, logits = kvfold.fold(model, q_ids, chunk_size, cache=cache)
    yield from kvfold.generate(model, cache, logits, max_new_tokens, stops)


def stream_text(tokenizer, token_ids, stops, out=sys.stdout):
    """Print the decoded text as tokens arrive; return the token ids.

    The growing list is decoded each time and only the new suffix is printed, so a character
    split over several byte tokens appears once it is complete.
    """
    ids, printed = [], ""
    for token in token_ids:
        ids.append(token)
        if token in stops:
            continue
        text = tokenizer.decode([t for t in ids if t not in stops])
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence; wait for its next byte
            continue
        out.write(text[len(printed):])
        out.flush()
        printed = text
    return ids


# ---------------------------------------------------------------------------------------------
# Cache files


def model_identity(checkpoint):
    """Return the sha256 of config.json followed by the checkpoint folder name.

    NOTE: two checkpoints with the same config.json in folders of the same name (e.g. a
    fine-tune) get the same identity, so a cache from one would be accepted by the other.
    """
    with open(os.path.join(checkpoint, "config.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return f"{digest}:{os.path.basename(os.path.abspath(checkpoint))}"


def save_cache(path, cache, ids, metadata):
    n = len(ids)
    tensors = {"k": cache.k[:, :, :, :n].contiguous().cpu(), "v": cache.v[:, :, :, :n].contiguous().cpu(),
               "token_ids": torch.tensor(ids, dtype=torch.int64)}
    try:
        save_file(tensors, path, metadata=metadata)
    except (OSError, SafetensorError) as e:
        raise UsageError(f"cannot write cache file {path}: {e}") from None


def read_cache(path):
    """Return (tensors, metadata) of a cache file, or raise UsageError if it is missing or invalid."""
    try:
        tensors = load_file(path)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(header_len)).get("__metadata__", {})
    except FileNotFoundError:
        raise UsageError(f"cache file {path} not found") from None
    except (OSError, SafetensorError, ValueError) as e:
        raise UsageError(f"cache file {path} is not a valid safetensors file ({e})") from None
    missing = [name for name in ("k", "v", "token_ids") if name not in tensors]
    missing += [key for key in ("model", "dtype", "chunk_size", "format") if key not in metadata]
    if missing:
        raise UsageError(f"cache file {path} is missing {', '.join(missing)}; save it again with --save-cache")
    return tensors, metadata


def load_cache(model, path, expected, file_ids, room):
    """Return (cache with `room` free positions, document token ids) from a cache file.

    expected contains the metadata this run would write. A cache from another model or dtype, or
    with another format or other token ids than file_ids (when given), is rejected.
    """
    tensors, metadata = read_cache(path)
    for key, label in (("model", "model"), ("dtype", "dtype"), ("format", "prompt format")):
        if metadata[key] != expected[key]:
            raise UsageError(f"cache file {path} was made with {label} {metadata[key]}, not {expected[key]}; "
                             "fold the document again without --load-cache")
    ids = tensors["token_ids"].tolist()
    if file_ids is not None and ids != file_ids:
        raise UsageError(f"cache file {path} contains other token ids than --file; use the file it was saved from, or drop --load-cache to fold --file again")
    k, v = tensors["k"], tensors["v"]
    cache = model.new_cache(len(ids) + room)
    if k.shape != v.shape or k.shape[:3] + k.shape[4:] != cache.k.shape[:3] + cache.k.shape[4:] or k.shape[3] != len(ids):
        raise UsageError(f"cache file {path} has tensors of shape {tuple(k.shape)}, which do not fit this model")
    cache.k[:, :, :, :len(ids)] = k.to(cache.k.device, cache.k.dtype)
    cache.v[:, :, :, :len(ids)] = v.to(cache.v.device, cache.v.dtype)
    cache.length = len(ids)
    return cache, ids


# ---------------------------------------------------------------------------------------------
# Command line


def read_document(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"file {path} not found") from None
    except UnicodeDecodeError:
        raise UsageError(f"file {path} is not UTF-8 text; convert it, e.g. with iconv") from None
    except OSError as e:
        raise UsageError(f"cannot read file {path}: {e.strerror}") from None
    if not text.strip():
        raise UsageError(f"file {path} contains no text")
    return text


EXAMPLE_FACTS = ("The lighthouse keeper's name is Marta Olsen.", "The annual budget was 4.2 million euros.")
EXAMPLE_QUESTIONS = ("What is the lighthouse keeper's name?", "What was the annual budget?")


def example_document(n_sentences=60, seed=0):
    """Return generated filler sentences (about 1000 tokens) with EXAMPLE_FACTS at one and two thirds."""
    import needle

    filler = needle.haystack_sentences(random.Random(seed))
    sentences = [next(filler).strip() for _ in range(n_sentences)]
    sentences.insert(2 * n_sentences // 3, EXAMPLE_FACTS[1])
    sentences.insert(n_sentences // 3, EXAMPLE_FACTS[0])
    return " ".join(sentences)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fold a long document into a KV cache once and answer questions about it.",
        epilog=f"--format auto picks chat for a checkpoint with a chat template. Measured on the built-in "
               f"SmolLM2-135M-Instruct (about 2000 tokens, 3 planted facts): {AUTO_MEASUREMENT}.")
    parser.add_argument("--checkpoint", help="Hugging Face Llama folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--file", help="UTF-8 text file to answer questions about (required unless --load-cache or --example)")
    parser.add_argument("--example", action="store_true",
                        help="use a generated report with two planted facts instead of --file, and ask about them unless --question is given")
    parser.add_argument("--question", action="append",
                        help="question to answer; repeat for several (default: read questions from stdin, one a line, until EOF or an empty line)")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per fold step (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="answer length limit in tokens (default: %(default)s)")
    parser.add_argument("--format", choices=("chat", "plain", "auto"), default="auto",
                        help="prompt format: the checkpoint's chat template, or 'Question: ... Answer:' text (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights and cache dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--save-cache", metavar="PATH", help="write the folded document to a safetensors file")
    parser.add_argument("--load-cache", metavar="PATH", help="read the folded document from a --save-cache file instead of folding it")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    if args.example and args.file:
        raise UsageError("give either --file or --example, not both")
    if args.file is None and args.load_cache is None and not args.example:
        raise UsageError("--file is required unless --load-cache or --example is given")
    for name in ("chunk_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {args.device!r}; use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    return args


def read_questions():
    """Yield questions typed on stdin until EOF or an empty line."""
    while True:
        if sys.stdin.isatty():
            print("question> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def main(argv=None):
    args = parse_args(argv)
    text = read_document(args.file) if args.file else None
    if args.example:
        text = example_document()
        args.question = args.question or list(EXAMPLE_QUESTIONS)
    if args.checkpoint is None:
        import prepare

        args.checkpoint = prepare.ensure_builtin(log=lambda m: print(m, file=sys.stderr))
    tokenizer = tok.load(args.checkpoint)
    template = resolve_format(tokenizer, args.format)
    stops = stop_ids(tokenizer)
    max_positions = llama.read_config(args.checkpoint).max_seq_len
    file_ids = document_ids(tokenizer, text, template) if text is not None else None
    if file_ids is not None and len(file_ids) >= max_positions:
        raise UsageError(f"--file {args.file} has {len(file_ids)} tokens, more than the model's {max_positions} positions; shorten it")

    if args.save_cache:
        folder = os.path.dirname(os.path.abspath(args.save_cache))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"--save-cache {args.save_cache}: folder {folder} is missing or not writable")
        if os.path.isdir(args.save_cache):
            raise UsageError(f"--save-cache {args.save_cache} is a folder; give a file name such as report.kv")
    if args.load_cache and not os.path.isfile(args.load_cache):
        raise UsageError(f"cache file {args.load_cache} not found")

    questions = [question_ids(tokenizer, q, template) for q in args.question] if args.question else None
    longest = max(map(len, questions)) if questions else INTERACTIVE_QUESTION_TOKENS
    room = longest + args.max_new_tokens

    start = time.perf_counter()
    model = llama.load(args.checkpoint, device=torch.device(args.device), dtype=DTYPES[args.dtype])
    print(f"loaded {args.checkpoint} ({args.dtype}, {args.device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    metadata = {"model": model_identity(args.checkpoint), "dtype": args.dtype,
                "chunk_size": str(args.chunk_size), "format": template}
    if args.load_cache:
        cache, ids = load_cache(model, args.load_cache, metadata, file_ids, room)
        print(f"loaded {len(ids)} document tokens from {args.load_cache}", file=sys.stderr)
    else:
        ids = file_ids
        start = time.perf_counter()
        cache = fold_document(model, ids, args.chunk_size, room, log=lambda m: print(f"\r{m}", end="", file=sys.stderr, flush=True))
        print(f"\nfolded {len(ids)} tokens in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.save_cache:
        save_cache(args.save_cache, cache, ids, metadata)
        print(f"saved the folded document to {args.save_cache}", file=sys.stderr)

    doc_len = len(ids)
    pending = iter(questions) if questions else (question_ids(tokenizer, q, template) for q in read_questions())
    for q_ids in pending:
        needed = len(q_ids) + args.max_new_tokens
        if doc_len + needed > max_positions:
            print(f"ask.py: error: the document and this question need {doc_len + needed} positions, "
                  f"more than the model's {max_positions}; ask a shorter question or lower --max-new-tokens", file=sys.stderr)
            continue
        cache = ensure_room(model, cache, doc_len, needed)
        stream_text(tokenizer, answer(model, cache, doc_len, q_ids, args.chunk_size, args.max_new_tokens, stops), stops)
        print(flush=True)


def run():
    try:
        main()
    except (UsageError, llama.CheckpointError, tok.TokenizerError) as e:
        print(f"ask.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
