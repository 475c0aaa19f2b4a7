"""Tests for tokenizer.py: token-for-token parity with the Hugging Face `tokenizers` library.

The byte-level BPE is compared with `tokenizers.Tokenizer.encode(text, add_special_tokens=False)`
on the real SmolLM2 tokenizer.json and on small tokenizers trained here with `tokenizers` itself
(Llama-3 pre-tokenizer, ignore_merges, added-token flags, every Split behavior). The
SentencePiece path uses a tiny model trained here. Runs on CPU in seconds.

The SmolLM2 folder is $KVFOLD_CHECKPOINT, by default checkpoints/smollm2-135m-instruct next to
this file; the default folder is converted with prepare.py when it is missing.
"""

import json
import os

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CHECKPOINT = os.path.join(HERE, "checkpoints", "smollm2-135m-instruct")

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

PYTHON_CODE = '''def fold(chunks, cache):
    """Prefill chunk by chunk."""
    for i, chunk in enumerate(chunks):
        if i % 2 == 0:
            cache[i] = chunk  # even
        else:
\t\tpass
    return {"n": len(chunks), 'ok': True}
'''
JSON_TEXT = '{"name": "kvfold", "sizes": [1, 22, 333], "nested": {"a": null, "b": -0.5e-3}, "s": "tab\\there"}'
C_CODE = "#include <stdio.h>\nint main(void) {\n\tint x = 0x1F;\n\tfor (int i = 0; i < 10; ++i) x += i;\n\tprintf(\"%d\\n\", x);\n\treturn 0;\n}\n"

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "chat": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
    "special-in-text": "x<|im_end|><|im_start|>y <|endoftext|> z<|begin_of_text|>w <|eot_id|>\n",
    "partial-special": "<|im_start <|im_end| im_end|> <|<|im_end|>|>",
    "digits": "12345 2024 3.14159 1,000,000 -42 0x1F 1e-9 007",
    "space-2024": " 2024",
    "space-before-digit": "a  1 x \t 9  42\n 7 \n\n 3",
    "whitespace": "a  b\tc\t\td\n\ne\n\n\nf   g \t \n h",
    "trailing-spaces": "end   ",
    "leading-spaces": "   start",
    "newlines-only": "\n\n\n",
    "crlf": "line1\r\nline2\r\n\r\nline3",
    "unicode-spaces": "a\u00a0b\u2003c\u3000d\x0be\x0cf\x85g\u2028h \x1c i",
    "accents": "Café naïve résumé façade Ångström coöperate",
    "german": "Größenwahn und Straßenbahn: Übermäßig schön, oder?",
    "greek": "Καλημέρα κόσμε, τι κάνεις; Ωραία!",
    "russian": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "chinese": "我爱自然语言处理。长上下文很重要！",
    "japanese": "日本語のテキスト、カタカナとひらがな。",
    "arabic": "مرحبا بالعالم، كيف حالك؟ ١٢٣",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं? १२३",
    "emoji": "I love 🍕! 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇺🇸 ❤️",
    "unicode-numbers": "² ½ Ⅻ ① x²+y³ 10½",
    "python": PYTHON_CODE,
    "json": JSON_TEXT,
    "c": C_CODE,
    "contractions": "I'm sure they'LL come; we've, you'd, it's, I'D, 'RE, don't",
    "empty": "",
}
# 30K characters, about 18K SmolLM2 tokens: a long-context input that also exercises the word cache.
CORPUS["long"] = ("\n\n".join(CORPUS.values()) * 30)[:30_000]


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_same_ids(ours, oracle, text):
    expected = oracle.encode(text, add_special_tokens=False).ids
    got = ours.encode(text)
    i = first_difference(got, expected)
    text_repr = repr(text) if len(text) <= 300 else repr(text[:300]) + f"... ({len(text)} characters)"
    assert got == expected, f"text {text_repr}: first difference at token {i}: ours {got[i:i + 5]}, tokenizers {expected[i:i + 5]}"


def save_folder(folder, tokenizer_json, **json_files):
    os.makedirs(folder, exist_ok=True)
    if isinstance(tokenizer_json, Tokenizer):
        tokenizer_json.save(os.path.join(folder, "tokenizer.json"))
    elif tokenizer_json is not None:
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_json, f)
    for name, obj in json_files.items():
        with open(os.path.join(folder, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(obj, f)
    return str(folder)


@pytest.fixture(scope="session")
def smollm_dir():
    folder = os.environ.get("KVFOLD_CHECKPOINT", DEFAULT_CHECKPOINT)
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")) and folder == DEFAULT_CHECKPOINT:
        import prepare

        prepare.ensure_builtin()
    assert os.path.isfile(os.path.join(folder, "tokenizer.json")), f"{folder}/tokenizer.json not found; run python prepare.py or set KVFOLD_CHECKPOINT"
    return folder


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    return tokenizer.load(smollm_dir), Tokenizer.from_file(os.path.join(smollm_dir, "tokenizer.json"))


@pytest.fixture(scope="session")
def llama3_style():
    """A small BPE trained on CORPUS with the Llama-3 pre-tokenizer, ignore_merges and special tokens."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=LLAMA3_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.values(), trainer)
    return tok


def write_variant(base, folder, pre_tokenizer="unchanged", **model_options):
    """Save a copy of base with another pre-tokenizer or BPE model options, and load it with both libraries.

    Returns (ours, oracle).
    """
    tok = Tokenizer.from_str(base.to_str())
    if pre_tokenizer != "unchanged":
        tok.pre_tokenizer = pre_tokenizer
    spec = json.loads(tok.to_str())
    spec["model"].update(model_options)
    save_folder(folder, spec)
    return tokenizer.load(str(folder)), Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


# --- SmolLM2 checkpoint ---

@pytest.mark.parametrize("name", CORPUS)
def test_smollm_encode_matches_tokenizers(smollm, name):
    assert_same_ids(*smollm, CORPUS[name])


@pytest.mark.parametrize("name", CORPUS)
def test_smollm_decode_round_trip(smollm, name):
    ours, oracle = smollm
    ids = ours.encode(CORPUS[name])
    assert ours.decode(ids) == CORPUS[name]
    assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=False)


def test_smollm_special_ids(smollm):
    ours, oracle = smollm
    assert ours.bos_id == 1
    assert ours.eos_id == 2
    assert ours.stop_ids == [2]
    assert ours.vocab_size == oracle.get_vocab_size() == 49152
    assert ours.special_tokens["<|im_start|>"] == 1
    assert ours.special_tokens["<|im_end|>"] == 2
    assert len(ours.special_tokens) == 17


def test_smollm_encode_bos(smollm):
    ours, _ = smollm
    assert ours.encode("hi", bos=True) == [1] + ours.encode("hi")
    assert ours.encode("", bos=True) == [1]


def test_decode_partial_utf8(smollm):
    ours, _ = smollm
    ids = ours.encode("ꙮ")  # 3 UTF-8 bytes, 3 tokens in SmolLM2's vocab
    assert len(ids) == 3, f"expected 'ꙮ' to be 3 byte tokens, got {ids}"
    assert ours.decode(ids[:2]) == "\ufffd"
    assert ours.decode(ids) == "ꙮ"


def test_smollm_drops_bytes_missing_from_vocab(smollm):
    # SmolLM2's vocab has no token for some control bytes (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d) and
    # for the lead bytes 0xf1 and 0xf2 (code points U+40000 to U+BFFFF). `tokenizers` drops them.
    ours, oracle = smollm
    for text in ["a\x04b\x1dc", "x\U00040000y"]:
        assert_same_ids(ours, oracle, text)
    assert ours.decode(ours.encode("a\x04b\x1dc")) == "abc"


def test_decode_out_of_range_id(smollm):
    ours, _ = smollm
    with pytest.raises(tokenizer.TokenizerError, match="49152"):
        ours.decode([49152])


# --- Llama-3-style tokenizer.json trained here ---

@pytest.mark.parametrize("name", CORPUS)
def test_llama3_style_matches_tokenizers(llama3_style, tmp_path_factory, name):
    folder = tmp_path_factory.getbasetemp() / "llama3-style"
    if not folder.exists():
        save_folder(folder, llama3_style)
    ours = tokenizer.load(str(folder))
    assert_same_ids(ours, llama3_style, CORPUS[name])
    assert ours.decode(ours.encode(CORPUS[name])) == CORPUS[name]


def test_ignore_merges_emits_vocab_word(llama3_style, tmp_path):
    # A word in the vocab that no merge produces: with ignore_merges it is one token.
    spec = json.loads(llama3_style.to_str())
    spec["model"]["vocab"]["Ġzqxjv"] = len(spec["model"]["vocab"]) + len(LLAMA3_SPECIAL)
    for ignore_merges in (True, False):
        spec["model"]["ignore_merges"] = ignore_merges
        folder = save_folder(tmp_path / str(ignore_merges), spec)
        ours, oracle = tokenizer.load(folder), Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        assert_same_ids(ours, oracle, "a zqxjv b")
        assert (spec["model"]["vocab"]["Ġzqxjv"] in ours.encode(" zqxjv")) == ignore_merges


ADDED_TOKENS = [
    AddedToken("<mask>", lstrip=True, rstrip=True, special=True, normalized=False),
    AddedToken("[word]", single_word=True, special=False, normalized=False),
    AddedToken("brown fox", special=False, normalized=True),
    AddedToken("<|eot", special=True, normalized=False),  # a prefix of <|eot_id|>
    # Overlaps "brown fox": tokens with normalized=false are matched first, in a separate pass.
    AddedToken("fox jumps", special=True, normalized=False),
]
ADDED_TEXTS = [
    "a <mask> b",
    "a  <mask>\n\nb<mask><mask>  <mask>",
    "x[word] [word] [word]y ([word])",
    "The quick brown fox brown foxes",
    "The quick brown fox jumps over brown fox jumps",
    "<|eot_id|> <|eot <|eot|> <|eot_id",
    "brown <mask> fox<|eot_id|>",
]


@pytest.mark.parametrize("text", ADDED_TEXTS)
def test_added_token_flags_match_tokenizers(llama3_style, tmp_path, text):
    tok = Tokenizer.from_str(llama3_style.to_str())
    tok.add_tokens(ADDED_TOKENS)
    ours = tokenizer.load(save_folder(tmp_path, tok))
    assert_same_ids(ours, tok, text)
    assert ours.decode(ours.encode(text)) == tok.decode(ours.encode(text), skip_special_tokens=False)


PRE_TOKENIZER_VARIANTS = {
    **{
        f"split-{behavior}-invert{invert}": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\s+|\p{N}"), behavior=behavior, invert=invert),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        for behavior in ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous")
        for invert in (False, True)
    },
    "split-string": pre_tokenizers.Sequence([
        pre_tokenizers.Split(", ", behavior="merged_with_next"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
    "digits-contiguous": pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
    "byte-level-prefix-space": pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
    "byte-level-no-regex": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
}


@pytest.mark.parametrize("variant", PRE_TOKENIZER_VARIANTS)
def test_pre_tokenizer_variant_matches_tokenizers(llama3_style, tmp_path, variant):
    ours, oracle = write_variant(llama3_style, tmp_path, PRE_TOKENIZER_VARIANTS[variant])
    for name, text in CORPUS.items():
        assert_same_ids(ours, oracle, text)


@pytest.mark.parametrize("options", [{}, {"unk_token": "<unk>"}, {"unk_token": "<unk>", "fuse_unk": True}], ids=["drop", "unk", "fuse-unk"])
def test_char_missing_from_vocab(tmp_path, options):
    # Trained without the byte alphabet, so bytes outside the ASCII text have no token.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS["english"]], trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"]))
    ours, oracle = write_variant(tok, tmp_path, **options)
    assert_same_ids(ours, oracle, "The Größe ЖЖ dog")


# --- special ids from config files ---

def test_eos_list_and_generation_config(llama3_style, tmp_path):
    folder = save_folder(
        tmp_path, llama3_style,
        config={"bos_token_id": 0, "eos_token_id": [1, 4]},
        generation_config={"eos_token_id": [4, 3]},
    )
    tok = tokenizer.load(folder)
    assert tok.bos_id == 0
    assert tok.eos_id == 1
    assert tok.stop_ids == [1, 4, 3]
    assert tok.special_tokens["<|start_header_id|>"] == 2


def test_special_ids_from_tokenizer_config(llama3_style, tmp_path):
    folder = save_folder(
        tmp_path, llama3_style,
        tokenizer_config={"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True}},
    )
    tok = tokenizer.load(folder)
    assert tok.bos_id == 0
    assert tok.eos_id == 4
    assert tok.stop_ids == [4]


def test_add_bos_follows_checkpoint(llama3_style, tmp_path):
    """add_bos is true when the post-processor prepends BOS, unless tokenizer_config.json sets add_bos_token."""
    with_template = Tokenizer.from_str(llama3_style.to_str())
    with_template.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    config = {"bos_token_id": 0, "eos_token_id": 1}

    plain = tokenizer.load(save_folder(tmp_path / "plain", llama3_style, config=config))
    templated = tokenizer.load(save_folder(tmp_path / "templated", with_template, config=config))
    overridden = tokenizer.load(save_folder(
        tmp_path / "overridden", with_template, config=config, tokenizer_config={"add_bos_token": False}))

    assert plain.add_bos is False
    assert templated.add_bos is True
    assert overridden.add_bos is False


def test_no_bos_token_raises(llama3_style, tmp_path):
    tok = tokenizer.load(save_folder(tmp_path, llama3_style))
    assert tok.bos_id is None
    with pytest.raises(tokenizer.TokenizerError, match="BOS"):
        tok.encode("hi", bos=True)


# --- SentencePiece ---

@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sentencepiece")
    corpus_file = folder / "corpus.txt"
    # ASCII training text, so that the other scripts are encoded through byte fallback.
    ascii_names = ["english", "digits", "whitespace", "python", "json", "c", "contractions"]
    corpus_file.write_text("\n".join(CORPUS[name] for name in ascii_names), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus_file), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return str(folder / "tokenizer.model")


def test_sentencepiece_load_and_round_trip(sentencepiece_model, tmp_path):
    os.symlink(sentencepiece_model, tmp_path / "tokenizer.model")
    tok = tokenizer.load(str(tmp_path))
    assert isinstance(tok, tokenizer.SentencePieceTokenizer)
    assert tok.vocab_size == 400
    # SentencePiece's defaults: <unk> 0, <s> 1, </s> 2.
    assert tok.bos_id == 1
    assert tok.eos_id == 2
    assert tok.stop_ids == [2]
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    for name in ("english", "python", "chinese", "emoji", "whitespace", "leading-spaces", "empty"):
        ids = tok.encode(CORPUS[name])
        assert tok.decode(ids) == CORPUS[name], f"round trip failed for {name!r}"
    assert tok.encode("hello", bos=True) == [1] + tok.encode("hello")


def test_sentencepiece_used_when_tokenizer_json_unsupported(sentencepiece_model, tmp_path):
    # Llama-2 and Mistral folders ship a Metaspace tokenizer.json next to tokenizer.model.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    save_folder(tmp_path, tok, config={"bos_token_id": 1, "eos_token_id": 2})
    os.symlink(sentencepiece_model, tmp_path / "tokenizer.model")
    assert isinstance(tokenizer.load(str(tmp_path)), tokenizer.SentencePieceTokenizer)


# --- errors ---

def test_load_missing_folder(tmp_path):
    with pytest.raises(tokenizer.TokenizerError, match="not found"):
        tokenizer.load(str(tmp_path / "nope"))


def test_load_folder_without_tokenizer(tmp_path):
    with pytest.raises(tokenizer.TokenizerError) as info:
        tokenizer.load(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message
    assert "tokenizer.model" in message
    assert "\n" not in message


@pytest.mark.parametrize("kind, build", [
    ("WordPiece", lambda: Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))),
    ("Unigram", lambda: Tokenizer(models.Unigram([("a", -1.0)], 0, byte_fallback=False))),
])
def test_unsupported_model_type(tmp_path, kind, build):
    tok = build()
    tok.decoder = decoders.ByteLevel()
    with pytest.raises(tokenizer.UnsupportedTokenizerError, match=kind):
        tokenizer.load(save_folder(tmp_path, tok))


def test_unsupported_pre_tokenizer_type(llama3_style, tmp_path):
    tok = Tokenizer.from_str(llama3_style.to_str())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(tokenizer.UnsupportedTokenizerError, match="Metaspace"):
        tokenizer.load(save_folder(tmp_path, tok))


def test_unsupported_normalizer_type(llama3_style, tmp_path):
    from tokenizers import normalizers

    tok = Tokenizer.from_str(llama3_style.to_str())
    tok.normalizer = normalizers.NFKC()
    with pytest.raises(tokenizer.UnsupportedTokenizerError, match="NFKC"):
        tokenizer.load(save_folder(tmp_path, tok))


# --- random text ---

def test_random_text_matches_tokenizers(smollm, llama3_style, tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    llama_folder = save_folder(tmp_path_factory.mktemp("llama3-random"), llama3_style)
    llama_ours = tokenizer.load(llama_folder)
    pieces = st.sampled_from(["<|im_start|>", "<|eot_id|>", " ", "  ", "\n", "\t", "1", " 2", "'s", "'LL"])
    # Code points unassigned in Python's unicodedata are left out: the `regex` package and
    # `tokenizers` may disagree on them because they use different Unicode versions.
    chars = st.characters(exclude_categories=("Cs", "Cn"))
    texts = st.lists(st.one_of(st.text(chars, max_size=20), pieces), max_size=12).map("".join)

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(texts)
    def check(text):
        for ours, oracle in (smollm, (llama_ours, llama3_style)):
            assert_same_ids(ours, oracle, text)
            if all(tokenizer.BYTE_TO_CHAR[b] in ours.vocab for b in text.encode("utf-8")):
                assert ours.decode(ours.encode(text)) == text

    check()
