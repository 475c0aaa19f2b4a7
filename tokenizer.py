"""Tokenizers for kvfold: byte-level BPE from tokenizer.json, or SentencePiece from tokenizer.model.

`load(checkpoint_dir)` reads a Hugging Face checkpoint folder and returns an object with
`encode(text, bos=False)`, `decode(ids)`, `bos_id`, `eos_id`, `stop_ids`, `vocab_size` and
`special_tokens`.

The byte-level BPE is written here in pure Python from the semantics of the Hugging Face
`tokenizers` library, and test_tokenizer.py checks it token for token against that library.
It differs from `tokenizers` in scope:
- Encoding matches `Tokenizer.encode(text, add_special_tokens=False)`, so added tokens in the text
  are matched whole, and the post-processor is not run. A BOS token is added only by `bos=True`.
- Only BPE models with a null normalizer, a ByteLevel decoder and the pre-tokenizers Sequence,
  Split, Digits and ByteLevel are supported, which is the layout of the GPT-2, Llama-3 and SmolLM2
  files. Anything else (a normalizer such as Qwen2's NFC, Llama-2's Metaspace) raises
  UnsupportedTokenizerError naming the type.
- There are no offsets, truncation, padding, batching or BPE dropout.
- `decode` keeps added tokens and writes them as their content, like
  `decode(ids, skip_special_tokens=False)`.

As in `tokenizers`, `encode` drops each byte that has no token in the vocab. SmolLM2, for
example, has no token for the bytes 0x04, 0x06, 0x13, 0x14, 0x16 and 0x1d, among others. So
`decode(encode(text)) == text` holds only when every byte of the text has a token.
"""

import json
import os

import regex

# GPT-2's split pattern, used by the ByteLevel pre-tokenizer when use_regex is true.
# NOTE: \p{L}, \p{N} and \s follow the Unicode version of the `regex` package, which may be newer
# than the one in `tokenizers`. With regex 2026.11.19 and tokenizers 0.23.3, code points that only
# the newer version assigns, e.g. CJK Extension J (U+323B0..U+3347F), split differently.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORD_CACHE_MAX = 100_000  # max cached pre-tokens, after which the cache is emptied
SPLIT_BEHAVIORS = ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous")
WORD_CHAR_AT_END = regex.compile(r"\w$")
WORD_CHAR_AT_START = regex.compile(r"\w")
SPACES_AT_END = regex.compile(r"\s*$")
SPACES_AT_START = regex.compile(r"\s*")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the file and the fix."""


class UnsupportedTokenizerError(TokenizerError):
    pass


def bytes_to_unicode():
    """Return GPT-2's map from each byte to the printable character that represents it in the vocab."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# Translates a string of code points 0-255 (bytes decoded as latin-1) to GPT-2 characters.
BYTE_TRANSLATION = str.maketrans({chr(b): c for b, c in BYTE_TO_CHAR.items()})


def split_text(pattern, text, behavior, invert=False):
    """Split text on the matches of pattern as `tokenizers` does for a Split pre-tokenizer.

    behavior is one of SPLIT_BEHAVIORS. Empty pieces are dropped.
    """
    segments = []  # [start, end, is_match] covering the whole text
    prev = 0
    for m in pattern.finditer(text):
        if m.start() != prev:
            segments.append([prev, m.start(), invert])
        segments.append([m.start(), m.end(), not invert])
        prev = m.end()
    if prev != len(text):
        segments.append([prev, len(text), invert])

    if behavior == "removed":
        segments = [s for s in segments if not s[2]]
    elif behavior in ("merged_with_previous", "merged_with_next", "contiguous"):
        reverse = behavior == "merged_with_next"
        merged, prev_match = [], False
        for seg in reversed(segments) if reverse else segments:
            is_match = seg[2]
            if behavior == "contiguous":
                join = merged and is_match == prev_match
            else:
                join = merged and is_match and not prev_match
            if join and reverse:
                merged[-1][0] = seg[0]
            elif join:
                merged[-1][1] = seg[1]
            else:
                merged.append(seg[:])
            prev_match = is_match
        segments = merged[::-1] if reverse else merged
    return [text[start:end] for start, end, _ in segments if end > start]


def build_pre_tokenizer(config):
    """Return a list of steps, each a function from one piece of text to a list of pieces."""
    if config is None:
        return []
    kind = config.get("type")
    if kind == "Sequence":
        return [step for child in config["pretokenizers"] for step in build_pre_tokenizer(child)]
    if kind == "Split":
        source = config["pattern"]
        pattern = regex.compile(source["Regex"] if "Regex" in source else regex.escape(source["String"]))
        # tokenizer.json spells behaviors in CamelCase ("MergedWithPrevious").
        behavior = regex.sub(r"(?<!^)(?=[A-Z])", "_", config["behavior"]).lower()
        if behavior not in SPLIT_BEHAVIORS:
            raise UnsupportedTokenizerError(f"unsupported Split behavior {config['behavior']!r} in tokenizer.json")
        return [lambda text: split_text(pattern, text, behavior, config.get("invert", False))]
    if kind == "Digits":
        # `tokenizers` splits on Rust's char::is_numeric: the categories Nd, Nl and No, as \p{N}.
        digits = regex.compile(r"\p{N}" if config.get("individual_digits") else r"\p{N}+")
        return [lambda text: split_text(digits, text, "isolated")]
    if kind == "ByteLevel":
        gpt2 = regex.compile(GPT2_PATTERN)

        def byte_level(text):
            if config.get("add_prefix_space") and not text.startswith(" "):
                text = " " + text
            pieces = split_text(gpt2, text, "isolated") if config.get("use_regex", True) else [text]
            return [p.encode("utf-8").decode("latin-1").translate(BYTE_TRANSLATION) for p in pieces]

        return [byte_level]
    raise UnsupportedTokenizerError(f"unsupported pre_tokenizer type {kind!r} in tokenizer.json; supported: Sequence, Split, Digits, ByteLevel")


class Tokenizer:
    """Common interface of the tokenizers that load() returns.

    bos_id and eos_id are None when the checkpoint defines no such token. stop_ids lists every
    end-of-sequence id, eos_id first. special_tokens maps the text of each added token of
    tokenizer.json, or each control and unknown piece of SentencePiece, to its id.
    """

    bos_id = None
    eos_id = None
    add_bos = False  # whether the checkpoint's own tokenizer starts every text with BOS
    stop_ids = ()
    vocab_size = 0
    special_tokens = {}

    def encode(self, text, bos=False):
        """Return the token ids of text, with bos_id first when bos is true."""
        if not bos:
            return self.encode_text(text)
        if self.bos_id is None:
            raise TokenizerError("encode(bos=True) needs a BOS token, but the checkpoint defines none")
        return [self.bos_id] + self.encode_text(text)


class BPETokenizer(Tokenizer):
    """Byte-level BPE tokenizer read from a Hugging Face tokenizer.json."""

    def __init__(self, path):
        spec = read_json_file(path)
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict):
            raise TokenizerError(f"{path} has no \"model\" object, so it is not a Hugging Face tokenizer.json; download it again")
        if model.get("type") != "BPE":
            raise UnsupportedTokenizerError(f"unsupported tokenizer model type {model.get('type')!r} in {path}; only BPE is supported")
        if spec.get("normalizer") is not None:
            raise UnsupportedTokenizerError(f"unsupported normalizer type {spec['normalizer'].get('type')!r} in {path}; only null is supported")
        decoder = (spec.get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise UnsupportedTokenizerError(f"unsupported decoder type {decoder!r} in {path}; only ByteLevel is supported")
        for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(option):
                raise UnsupportedTokenizerError(f"unsupported BPE option {option}={model[option]!r} in {path}")

        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
            raise TokenizerError(f"{path}: model.vocab must map tokens to ids; download tokenizer.json again")
        if not isinstance(merges, list) or not all(isinstance(m, (str, list)) for m in merges):
            raise TokenizerError(f"{path}: model.merges must be a list of merges; download tokenizer.json again")
        self.vocab = dict(vocab)
        merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
        # A later duplicate of a merge overwrites the earlier rank, as in `tokenizers`.
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.ignore_merges = model.get("ignore_merges", False)
        self.byte_fallback = model.get("byte_fallback", False)
        self.unk_token = model.get("unk_token")
        self.fuse_unk = model.get("fuse_unk", False)
        self.pre_tokenizer = build_pre_tokenizer(spec.get("pre_tokenizer"))
        # Llama-3 files prepend BOS in a TemplateProcessing post-processor; GPT-2 style files do not.
        template = (spec.get("post_processor") or {}).get("single") or [{}]
        self.adds_bos_by_default = "SpecialToken" in template[0]

        self.added = {t["content"]: t for t in spec.get("added_tokens", [])}
        self.special_tokens = {t["content"]: t["id"] for t in self.added.values()}
        # `tokenizers` matches tokens with normalized=false first, then, in a second pass over the
        # normalized rest, tokens with normalized=true. Normalization is the identity here.
        # Sorting longest first makes the regex alternation pick the longest token at the leftmost
        # position, like the leftmost-longest Aho-Corasick matcher of `tokenizers`.
        self.added_patterns = []
        for normalized in (False, True):
            contents = [c for c, t in self.added.items() if t.get("normalized", not t.get("special")) == normalized]
            contents.sort(key=len, reverse=True)
            if contents:
                self.added_patterns.append(regex.compile("|".join(regex.escape(c) for c in contents)))

        self.id_to_token = {i: tok for tok, i in self.vocab.items()}
        self.id_to_token.update((i, tok) for tok, i in self.special_tokens.items())
        self.vocab_size = max(self.id_to_token) + 1
        self.cache = {}

    def token_id(self, token):
        return self.special_tokens.get(token, self.vocab.get(token))

    def split_added(self, text, pattern):
        """Split text into (piece, id) pairs, with id None for text between added tokens."""
        out, start_offset = [], 0
        for m in pattern.finditer(text):
            start, stop = m.span()
            token = self.added[m.group()]
            if token.get("single_word") and (WORD_CHAR_AT_END.search(text[:start]) or WORD_CHAR_AT_START.match(text[stop:])):
                continue
            # lstrip and rstrip make the token take the whitespace around it. Whitespace that the
            # previous token's rstrip took stays with that token.
            if token.get("lstrip"):
                start = max(SPACES_AT_END.search(text[:start]).start(), start_offset)
            if token.get("rstrip"):
                stop += SPACES_AT_START.match(text[stop:]).end()
            if start_offset < start:
                out.append((text[start_offset:start], None))
            out.append((text[start:stop], token["id"]))
            start_offset = stop
        if start_offset < len(text):
            out.append((text[start_offset:], None))
        return out

    def encode_text(self, text):
        pieces = [(text, None)]
        for pattern in self.added_patterns:
            split = []
            for piece, added_id in pieces:
                if added_id is None:
                    split.extend(self.split_added(piece, pattern))
                else:
                    split.append((piece, added_id))
            pieces = split

        ids = []
        for piece, added_id in pieces:
            if added_id is not None:
                ids.append(added_id)
                continue
            words = [piece]
            for step in self.pre_tokenizer:
                words = [w for word in words for w in step(word)]
            for word in words:
                cached = self.cache.get(word)
                if cached is None:
                    if len(self.cache) >= WORD_CACHE_MAX:
                        self.cache.clear()
                    cached = self.cache[word] = self.bpe(word)
                ids.extend(cached)
        return ids

    def bpe(self, word):
        """Return the ids of one pre-token, merging the lowest-ranked adjacent pair first."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]

        symbols = []
        for ch in word:
            if ch in self.vocab:
                symbols.append(ch)
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.vocab for b in ch.encode("utf-8")):
                symbols.extend(f"<0x{b:02X}>" for b in ch.encode("utf-8"))
            elif self.unk_token is not None and not (self.fuse_unk and symbols and symbols[-1] == self.unk_token):
                symbols.append(self.unk_token)
            # Without byte fallback or unk_token, `tokenizers` drops a character missing from the vocab.

        while len(symbols) > 1:
            ranks = [self.merge_ranks.get(pair) for pair in zip(symbols, symbols[1:])]
            best = min((r for r in ranks if r is not None), default=None)
            if best is None:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(ranks) and ranks[i] == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.vocab[s] for s in symbols]

    def decode(self, ids):
        """Return the text of ids; a partial UTF-8 sequence becomes U+FFFD."""
        out = bytearray()
        for i in ids:
            token = self.id_to_token.get(i)
            if token is None:
                raise TokenizerError(f"token id {i} is out of range for this tokenizer (vocab_size {self.vocab_size})")
            # Like `tokenizers`, a token with a character outside GPT-2's byte map is written as is.
            if token in self.special_tokens or not all(c in CHAR_TO_BYTE for c in token):
                out += token.encode("utf-8")
            else:
                out += bytes(CHAR_TO_BYTE[c] for c in token)
        return out.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece tokenizer read from tokenizer.model (Llama-2, Mistral)."""

    def __init__(self, path):
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError(f"{path} needs the sentencepiece package; install it with: pip install sentencepiece") from None

        # SentencePiece models are protobuf files: parsing one runs no code from the checkpoint.
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is not a valid SentencePiece model ({e}); download it again") from None
        self.adds_bos_by_default = True  # as transformers' LlamaTokenizer does
        self.vocab_size = self.sp.get_piece_size()
        self.special_tokens = {
            self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }

    def token_id(self, token):
        i = self.sp.piece_to_id(token)  # returns the unk id for an unknown piece
        return i if self.sp.id_to_piece(i) == token else None

    def encode_text(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


def read_json_file(path):
    """Return the parsed contents of a JSON file, or raise TokenizerError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # invalid JSON, or bytes that are not UTF-8
        raise TokenizerError(f"{path} is not valid JSON ({e}); download it again") from None


def read_json(folder, name):
    """Return the JSON object of an optional file in folder, or {} if the file does not exist."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must contain a JSON object; download it again")
    return data


def as_id_list(value, path, key):
    """Return a token id, a list of ids or None as a list of ids; raise TokenizerError for anything else."""
    if value is None:
        ids = []
    elif isinstance(value, list):
        ids = value
    else:
        ids = [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TokenizerError(f"{path}: {key} must be a token id or a list of token ids, got {value!r}; download it again")
    return ids


def set_special_ids(tok, folder):
    """Set bos_id, eos_id and stop_ids on tok from the checkpoint's JSON files.

    The ids come from config.json, else from tokenizer_config.json's token strings, else, for
    SentencePiece, from the model itself. stop_ids adds generation_config.json's eos_token_id.
    """
    config = read_json(folder, "config.json")
    tokenizer_config = read_json(folder, "tokenizer_config.json")
    config_path = os.path.join(folder, "config.json")
    ids = {}
    for name in ("bos", "eos"):
        value = config.get(f"{name}_token_id")
        if value is None:
            content = tokenizer_config.get(f"{name}_token")
            content = content.get("content") if isinstance(content, dict) else content
            if content is not None and not isinstance(content, str):
                raise TokenizerError(f"{os.path.join(folder, 'tokenizer_config.json')}: {name}_token must be a string, "
                                     f"got {content!r}; download it again")
            value = tok.token_id(content) if content is not None else None
        if value is None and isinstance(tok, SentencePieceTokenizer):
            value = getattr(tok.sp, f"{name}_id")()
            value = value if value >= 0 else None
        ids[name] = as_id_list(value, config_path, f"{name}_token_id")
    tok.bos_id = ids["bos"][0] if ids["bos"] else None
    if tok.bos_id is not None and tok.bos_id >= tok.vocab_size:
        raise TokenizerError(f"{config_path}: bos_token_id {tok.bos_id} is outside the tokenizer's {tok.vocab_size} tokens; "
                             "the tokenizer files do not belong to this checkpoint")
    add_bos = tokenizer_config.get("add_bos_token", tok.adds_bos_by_default)
    tok.add_bos = bool(add_bos) and tok.bos_id is not None
    tok.eos_id = ids["eos"][0] if ids["eos"] else None

    # generation_config.json lists the ids that end a chat turn for Hugging Face generate().
    generation_eos = as_id_list(read_json(folder, "generation_config.json").get("eos_token_id"),
                                os.path.join(folder, "generation_config.json"), "eos_token_id")
    tok.stop_ids = list(dict.fromkeys(ids["eos"] + generation_eos))
    return tok


def read_bpe(path):
    """Return the BPETokenizer of a tokenizer.json, turning a malformed file into TokenizerError."""
    try:
        return BPETokenizer(path)
    except TokenizerError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, regex.error) as e:
        # A field deeper than those BPETokenizer checks by hand (e.g. a pre-tokenizer) is missing or of the wrong type.
        raise TokenizerError(f"{path} is malformed ({type(e).__name__}: {e}); download it again") from None


def load(checkpoint_dir):
    """Load the tokenizer of a checkpoint folder: tokenizer.json if supported, else tokenizer.model.

    Llama-2 and Mistral folders ship both files, and their tokenizer.json is a SentencePiece-style
    BPE that this file does not support, so tokenizer.model is used for them. Raises
    TokenizerError for missing or malformed files, and for a tokenizer with more tokens than
    config.json's vocab_size, whose extra ids the model could not embed.
    """
    if not os.path.isdir(checkpoint_dir):
        problem = "is not a folder" if os.path.exists(checkpoint_dir) else "not found"
        raise TokenizerError(f"checkpoint folder {checkpoint_dir} {problem}")
    json_path = os.path.join(checkpoint_dir, "tokenizer.json")
    sp_path = os.path.join(checkpoint_dir, "tokenizer.model")
    tok = None
    if os.path.isfile(json_path):
        try:
            tok, path = read_bpe(json_path), json_path
        except UnsupportedTokenizerError:
            if not os.path.isfile(sp_path):
                raise
    if tok is None and os.path.isfile(sp_path):
        tok, path = SentencePieceTokenizer(sp_path), sp_path
    if tok is None:
        raise TokenizerError(
            f"no tokenizer.json or tokenizer.model in {checkpoint_dir}; "
            "copy them from the model's Hugging Face repository, or run python prepare.py for the built-in model"
        )
    set_special_ids(tok, checkpoint_dir)
    model_vocab = read_json(checkpoint_dir, "config.json").get("vocab_size")
    if isinstance(model_vocab, int) and tok.vocab_size > model_vocab:
        raise TokenizerError(f"{path} has {tok.vocab_size} tokens but config.json's vocab_size is {model_vocab}; "
                             "the tokenizer files do not belong to this checkpoint")
    return tok
