"""Fold a long document into a KV cache once, then answer questions about it from that cache.

The document part of the prompt is folded chunk by chunk (kvfold.fold). Each question is then
folded after it, and the answer is decoded greedily and streamed to stdout. Before the next
question, cache.length is set back to the document's end, so the next forward overwrites the
previous question and answer and the document is never folded twice.

    python ask.py --file REPORT.txt --question "Who signed the report?"
    python ask.py --file REPORT.txt --save-cache report.kv          # then questions from stdin
    python ask.py --file REPORT.txt --load-cache report.kv --question "When?"
"""

import hashlib
import os
import random
import sys
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import kvfold
import memory
import model as llama
import needle
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


UsageError = needle.UsageError  # invalid arguments or input files; run() prints the message and exits with status 2


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
    """Write the document's keys, values and token ids to path.

    The file is written under a temporary name and renamed, so an interrupted write never leaves a
    truncated cache file at path.
    """
    n = len(ids)
    tensors = {"k": cache.k[:, :, :, :n].contiguous().cpu(), "v": cache.v[:, :, :, :n].contiguous().cpu(),
               "token_ids": torch.tensor(ids, dtype=torch.int64)}
    partial = path + ".partial"
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    except (OSError, SafetensorError) as e:
        raise UsageError(f"cannot write cache file {path}: {e}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def read_cache_header(path, expected):
    """Check a cache file's header against the metadata this run would write; return its document length in tokens.

    Reads no tensor data, so a missing, invalid or mismatched file is rejected before the model
    loads. A cache from another model or dtype, or with another prompt format, raises UsageError.
    """
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except FileNotFoundError:
        raise UsageError(f"cache file {path} not found") from None
    except (OSError, SafetensorError) as e:
        raise UsageError(f"cache file {path} is not a valid safetensors file ({e})") from None
    missing = [name for name in ("k", "v", "token_ids") if name not in shapes]
    missing += [key for key in ("model", "dtype", "chunk_size", "format") if key not in metadata]
    if missing:
        raise UsageError(f"cache file {path} is missing {', '.join(missing)}; save it again with --save-cache")
    for key, label in (("model", "model"), ("dtype", "dtype"), ("format", "prompt format")):
        if metadata[key] != expected[key]:
            raise UsageError(f"cache file {path} was made with {label} {metadata[key]}, not {expected[key]}; "
                             "fold the document again without --load-cache")
    if len(shapes["token_ids"]) != 1:
        raise UsageError(f"cache file {path} has token_ids of shape {tuple(shapes['token_ids'])}; save it again with --save-cache")
    return shapes["token_ids"][0]


def load_cache(model, path, expected, file_ids, room):
    """Return (cache with `room` free positions, document token ids) from a cache file.

    expected contains the metadata this run would write. A cache from another model or dtype, or
    with another format or other token ids than file_ids (when given), is rejected.
    """
    read_cache_header(path, expected)
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise UsageError(f"cache file {path} is not a valid safetensors file ({e})") from None
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


EXAMPLE_FACTS = ("The lighthouse keeper's name is Marta Olsen.", "The annual budget was 4.2 million euros.")
EXAMPLE_QUESTIONS = ("What is the lighthouse keeper's name?", "What was the annual budget?")


def example_document(n_sentences=60, seed=0):
    """Return generated filler sentences (about 1000 tokens) with EXAMPLE_FACTS at one and two thirds."""
    filler = needle.haystack_sentences(random.Random(seed))
    sentences = [next(filler).strip() for _ in range(n_sentences)]
    sentences.insert(2 * n_sentences // 3, EXAMPLE_FACTS[1])
    sentences.insert(n_sentences // 3, EXAMPLE_FACTS[0])
    return " ".join(sentences)


def parse_args(argv=None):
    parser = needle.ArgumentParser(
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
    parser.add_argument("--allow-long", action="store_true",
                        help="allow a document and questions beyond the model's max_position_embeddings, "
                             "where RoPE was not trained (prints a warning)")
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
    needle.check_device(args.device, [args.dtype])
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


def check_inputs(args, text):
    """Check everything that can fail before the model loads; return what the run needs.

    Returns (tokenizer, template, document ids or None with --load-cache alone, question ids or
    None for stdin questions, room after the document, cache metadata).
    """
    model_args = llama.read_config(args.checkpoint)
    llama.check_weights(args.checkpoint, model_args)
    tokenizer = tok.load(args.checkpoint)
    template = resolve_format(tokenizer, args.format)
    metadata = {"model": model_identity(args.checkpoint), "dtype": args.dtype,
                "chunk_size": str(args.chunk_size), "format": template}
    file_ids = document_ids(tokenizer, text, template) if text is not None else None
    if args.save_cache:
        needle.check_output_path(args.save_cache, "--save-cache", create_folder=False)
    if args.load_cache:
        doc_len = read_cache_header(args.load_cache, metadata)
        if file_ids is not None and doc_len != len(file_ids):
            raise UsageError(f"cache file {args.load_cache} contains {doc_len} document tokens, but --file {args.file} "
                             f"has {len(file_ids)}; use the file it was saved from, or drop --load-cache to fold --file again")
    else:
        doc_len = len(file_ids)

    max_positions = model_args.max_seq_len
    needle.check_length(doc_len, max_positions, args.allow_long, f"the document ({doc_len} tokens)")
    questions = [question_ids(tokenizer, q, template) for q in args.question] if args.question else None
    longest = max(map(len, questions)) if questions else INTERACTIVE_QUESTION_TOKENS
    room = longest + args.max_new_tokens
    if questions:
        needle.check_length(doc_len + room, max_positions, args.allow_long,
                            f"the document, the longest question and --max-new-tokens ({doc_len + room} tokens)")

    device = torch.device(args.device)
    dtype_bytes = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    plan = memory.plan(model_args, "fold", doc_len + room, args.chunk_size, dtype_bytes)
    needle.check_fits(sum(plan.values()), memory.free_bytes(device), device,
                      "use a shorter document, a lower --max-new-tokens or a smaller --chunk-size")
    return tokenizer, template, file_ids, questions, room, metadata


def answer_all(model, tokenizer, cache, doc_len, pending, args, stops):
    """Answer each question (token ids) from pending after the document's cached doc_len positions, streaming to stdout."""
    max_positions = model.args.max_seq_len
    for q_ids in pending:
        needed = len(q_ids) + args.max_new_tokens
        if doc_len + needed > max_positions:
            message = (f"the document and this question need {doc_len + needed} positions, "
                       f"more than the model's {max_positions}")
            if not args.allow_long:
                print(f"ask.py: error: {message}; ask a shorter question, lower --max-new-tokens or pass --allow-long",
                      file=sys.stderr)
                continue
            print(f"warning: {message}; RoPE was not trained there, so expect worse results (--allow-long)", file=sys.stderr)
        cache = ensure_room(model, cache, doc_len, needed)
        stream_text(tokenizer, answer(model, cache, doc_len, q_ids, args.chunk_size, args.max_new_tokens, stops), stops)
        print(flush=True)


def main(argv=None):
    args = parse_args(argv)
    text = needle.read_text_file(args.file, "--file") if args.file else None
    if args.example:
        text = example_document()
        args.question = args.question or list(EXAMPLE_QUESTIONS)
    if args.checkpoint is None:
        args.checkpoint = needle.builtin_checkpoint()
    tokenizer, template, file_ids, questions, room, metadata = check_inputs(args, text)

    start = time.perf_counter()
    model = llama.load(args.checkpoint, device=torch.device(args.device), dtype=DTYPES[args.dtype])
    print(f"loaded {args.checkpoint} ({args.dtype}, {args.device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    saved = None
    try:
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
            saved = args.save_cache
            print(f"saved the folded document to {args.save_cache}", file=sys.stderr)

        stops = stop_ids(tokenizer)
        pending = iter(questions) if questions else (question_ids(tokenizer, q, template) for q in read_questions())
        answer_all(model, tokenizer, cache, len(ids), pending, args, stops)
    except KeyboardInterrupt:
        if saved:
            summary = f"the folded document is saved in {saved}; reuse it with --load-cache {saved}"
        elif args.save_cache:
            summary = f"the folded document was not saved to {args.save_cache} yet"
        else:
            summary = "nothing was saved; pass --save-cache PATH to keep the folded document"
        print(f"\ninterrupted; {summary}", file=sys.stderr)
        sys.exit(130)


def run():
    needle.run_command(main, "ask.py", "interrupted before the document was folded; nothing was saved")


if __name__ == "__main__":
    run()
