"""Llama-3.1 in one file, for inference over a preallocated KV cache.

Reads a Hugging Face checkpoint folder (config.json plus safetensors weights) and runs chunks
of tokens at absolute positions against a KV cache that is allocated once. That is all KV-Fold
needs from a model: `forward(tokens, cache)` writes the chunk's keys and values at
`cache.length` and attends to every key before them.

Differences from the Hugging Face implementation:
- no training, dropout, padding masks or batching of unequal lengths;
- the RoPE tables are built in float64 and applied in fp32 (fp64 for an fp64 model) whatever
  the model dtype;
- a forward returns logits only for the positions asked for (the last one by default).
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# Config


# Names of the expected kinds in config.json type errors, and the config.json key of each ModelArgs field.
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", dict: "an object"}
CONFIG_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
               "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "hidden_dim": "intermediate_size",
               "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings"}


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # width of the SwiGLU MLP
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_seq_len: int  # positions the model was trained on
    tie_word_embeddings: bool
    rope_scaling: dict | None = None  # llama3 scaling: factor, low/high_freq_factor, original_max_position_embeddings
    bos_id: int | None = None
    eos_ids: tuple = ()

    @classmethod
    def from_config(cls, cfg, source="config.json"):
        """Build the args from a Hugging Face config dict, rejecting what this file does not implement.

        Every field is type-checked before use, so a malformed config.json raises CheckpointError
        naming the field instead of failing later inside torch.
        """

        def invalid(message):
            return CheckpointError(f"{source}: {message}; correct config.json or download the checkpoint again")

        def number(value, name):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise invalid(f"{name} must be a number, got {value!r}")
            return float(value)

        def get(key, kind, default=None):
            value = cfg.get(key, default)
            if value is None:
                return None
            if kind is float:
                return number(value, key)
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                raise invalid(f"{key} must be {KIND_NAMES[kind]}, got {value!r}")
            return value

        model_type = get("model_type", str)
        archs = get("architectures", list) or []
        if not all(isinstance(name, str) for name in archs):
            raise invalid(f"architectures must be a list of class names, got {archs!r}")
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise CheckpointError(
                f"{source}: unsupported architecture {archs or model_type!r}; "
                "this implementation runs Llama models (LlamaForCausalLM) only")
        for key in ("attention_bias", "mlp_bias"):
            if get(key, bool):
                raise CheckpointError(f"{source}: {key}=true is not supported (Llama-3.1 has no biases)")
        if get("hidden_act", str, "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported, only 'silu'")

        # Recent transformers versions write RoPE settings under rope_parameters; Llama-3.1
        # downloads keep rope_theta and rope_scaling at the top level.
        rope = dict(get("rope_parameters", dict) or {})
        theta = rope.pop("rope_theta", None)
        theta = get("rope_theta", float, 10000.0) if theta is None else number(theta, "rope_parameters.rope_theta")
        if theta <= 0:
            raise invalid(f"rope_theta must be positive, got {theta}")
        scaling_key = "rope_parameters" if rope else "rope_scaling"
        scaling = rope if rope else get("rope_scaling", dict)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in needed if scaling.get(k) is None]
            if missing:
                raise invalid(f"llama3 rope scaling is missing {', '.join(missing)}")
            scaling = {k: number(scaling[k], f"{scaling_key}.{k}") for k in needed}
            if min(scaling.values()) <= 0:
                raise invalid(f"{scaling_key} values must be positive, got {scaling}")
            # rope_frequencies divides by high_freq_factor - low_freq_factor.
            if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
                raise invalid(f"{scaling_key}.high_freq_factor must exceed low_freq_factor, got {scaling}")
        else:
            raise CheckpointError(
                f"{source}: rope_type {rope_type!r} is not supported; only 'llama3' scaling or none is implemented")

        dim = get("hidden_size", int)
        n_heads = get("num_attention_heads", int)
        n_kv_heads = get("num_key_value_heads", int, n_heads)
        eos = cfg.get("eos_token_id")
        if eos is None:
            eos_ids = ()
        elif isinstance(eos, list):
            eos_ids = tuple(eos)
        else:
            eos_ids = (eos,)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise invalid(f"eos_token_id must be a token id or a list of token ids, got {eos!r}")
        args = cls(
            dim=dim,
            n_layers=get("num_hidden_layers", int),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=get("head_dim", int, None) or (dim // n_heads if dim and n_heads else None),
            hidden_dim=get("intermediate_size", int),
            vocab_size=get("vocab_size", int),
            norm_eps=get("rms_norm_eps", float, 1e-5),
            rope_theta=theta,
            max_seq_len=get("max_position_embeddings", int, 2048),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            rope_scaling=scaling,
            bos_id=get("bos_token_id", int, None),
            eos_ids=eos_ids,
        )
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "max_seq_len"):
            if not isinstance(getattr(args, key), int) or getattr(args, key) <= 0:
                raise invalid(f"{CONFIG_KEYS[key]} must be a positive integer, got {getattr(args, key)!r}")
        if args.norm_eps <= 0:
            raise invalid(f"rms_norm_eps must be positive, got {args.norm_eps}")
        if n_heads % n_kv_heads:
            raise invalid(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
        if args.head_dim % 2:
            raise invalid(f"head_dim {args.head_dim} must be even for RoPE")
        special = [("bos_token_id", args.bos_id)] if args.bos_id is not None else []
        for key, token_id in special + [("eos_token_id", i) for i in eos_ids]:
            if not 0 <= token_id < args.vocab_size:
                raise invalid(f"{key} {token_id} is outside the vocabulary of {args.vocab_size} tokens")
        return args


# ---------------------------------------------------------------------------------------------
# Layers


def compute_dtype(dtype):
    """Return the dtype for norms, RoPE and logits: fp32, or fp64 for an fp64 model."""
    return torch.promote_types(dtype, torch.float32)


def half_matmul_is_slow():
    """Return True on CPUs without bf16 matrix instructions (AMX or AVX512-BF16), such as AVX2-only ones."""
    return not (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


class Linear(nn.Linear):
    """Linear layer without bias that, on CPUs without bf16 units, multiplies bf16 and fp16 in fp32.

    On 2 AVX2 cores torch's bf16 kernel ran at 19 GFLOP/s against 100 in fp32. The product of two
    bf16 or fp16 numbers is exact in fp32, and the half-precision kernels accumulate in fp32 too.
    So upcasting the operands and rounding the result back gives the same numbers up to the order
    of summation: test_kvfold.py finds them equal or one rounding step apart.
    Below 4 rows (decoding) upcasting the weight costs more than it saves, so the native kernel runs.
    """

    upcast_half_on_cpu = half_matmul_is_slow()

    def __init__(self, in_features, out_features, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)

    def forward(self, x):
        if (self.upcast_half_on_cpu and x.dtype in (torch.bfloat16, torch.float16)
                and x.device.type == "cpu" and x.numel() >= 4 * x.shape[-1]):
            return F.linear(x.float(), self.weight.float()).to(x.dtype)
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x):
        # Normalise in fp32 (fp64 for an fp64 model), as the reference does, then scale in the
        # model dtype.
        xc = x.to(compute_dtype(x.dtype))
        xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xc.to(x.dtype)


def rope_frequencies(head_dim, theta, scaling=None):
    """Return the RoPE inverse frequencies (head_dim/2,) in float64, with llama3 scaling if given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    if scaling is None:
        return inv_freq
    # Llama-3.1 scaling: wavelengths shorter than original_context / high_freq_factor keep their
    # frequency, those longer than original_context / low_freq_factor are slowed by `factor`, and
    # the band between is a linear blend of the two in 1/wavelength.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(positions, inv_freq, dtype=torch.float32):
    """Return cos and sin tables (T, head_dim) in dtype (fp32 by default) for integer positions.

    Angles are computed in float64: in fp32 a position near 100K times a frequency near 1 keeps
    only about 3 digits after the point, and in bf16 the error reaches whole radians.
    """
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device, torch.float64)[None, :]  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: pairs are (i, i + head_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, head_dim) by the tables (T, head_dim), in the tables' dtype or wider."""
    xc = x.to(torch.promote_types(x.dtype, cos.dtype))
    half = x.shape[-1] // 2
    rotated = torch.cat([-xc[..., half:], xc[..., :half]], dim=-1)
    return (xc * cos + rotated * sin).to(x.dtype)


def chunk_mask(start, n_queries, n_keys, device):
    """Return the boolean mask (n_queries, n_keys) of a chunk whose queries sit at start.. .

    Query i is at absolute position start + i and may see keys 0..start + i. SDPA's
    is_causal=True anchors the triangle at the top-left corner, which is wrong whenever the
    queries are fewer than the keys, so the mask is built from positions instead.
    """
    q_pos = torch.arange(start, start + n_queries, device=device)
    k_pos = torch.arange(n_keys, device=device)
    return k_pos[None, :] <= q_pos[:, None]


class KVCache:
    """Keys and values of every layer, allocated once for max_len positions.

    k and v have shape (n_layers, B, n_kv_heads, max_len, head_dim). Positions 0..length-1 are
    filled; a forward writes the next chunk at `length` and then advances it.
    """

    def __init__(self, args, max_len, batch_size=1, device="cpu", dtype=torch.float32):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self):
        return self.k.shape[3]

    def nbytes(self):
        return self.k.numel() * self.k.element_size() * 2


class Attention(nn.Module):
    def __init__(self, args, device=None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = Linear(args.dim, args.n_heads * args.head_dim, device)
        self.k_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, device)
        self.v_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, device)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, device)

    def forward(self, x, cos, sin, cache_k, cache_v, start, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Write this chunk's keys and values at their absolute positions, then attend to the
        # whole prefix: keys 0..start+T-1.
        end = start + T
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        keys, values = cache_k[:, :, :end], cache_v[:, :, :end]  # (B, n_kv_heads, end, head_dim)

        # Query head j reads KV head j // (n_heads / n_kv_heads). enable_gqa applies that mapping
        # inside the kernel, so the cache is not copied once per query head.
        # A chunk at position 0 has as many queries as keys, the one case where is_causal=True
        # is right, and it lets SDPA skip the mask. A single query sees every key.
        if mask is None and T > 1 and start > 0:
            mask = chunk_mask(start, T, end, x.device)
        causal = T > 1 and start == 0
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)  # (B, n_heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args, device=None):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.hidden_dim, device)
        self.up_proj = Linear(args.dim, args.hidden_dim, device)
        self.down_proj = Linear(args.hidden_dim, args.dim, device)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps, device)
        self.self_attn = Attention(args, device)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps, device)
        self.mlp = MLP(args, device)

    def forward(self, x, cos, sin, cache_k, cache_v, start, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# Model


class Transformer(nn.Module):
    """Llama decoder. Submodule names equal the checkpoint's names without the "model." prefix."""

    def __init__(self, args, device=None):
        super().__init__()
        self.args = args
        # On the meta device an explicit weight skips the random init, which there imports torch._dynamo
        # (about 80 MiB and 800 modules).
        meta_weight = torch.empty(args.vocab_size, args.dim, device="meta") if str(device) == "meta" else None
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, device=device, _weight=meta_weight)
        self.layers = nn.ModuleList(Block(args, device) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, device)
        self.lm_head = Linear(args.dim, args.vocab_size, device)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A plain attribute, not a buffer: Module.to(dtype) would round a buffer to bf16.
        self.inv_freq = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def new_cache(self, max_len, batch_size=1):
        return KVCache(self.args, max_len, batch_size, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens, cache, logits_for=slice(-1, None), return_hidden=False):
        """Run a chunk of tokens (B, T) at positions cache.length.. and append its keys and values.

        Returns logits (B, len(logits_for), vocab) in fp32 (fp64 for an fp64 model) of the chunk
        positions selected by logits_for (the last one by default; None for no logits). With
        return_hidden, returns (logits, final hidden states (B, T, dim) after the last norm).
        """
        B, T = tokens.shape
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"chunk of {T} tokens at position {start} overflows the cache of {cache.max_len} positions")
        positions = torch.arange(start, start + T, device=tokens.device)
        cos, sin = rope_tables(positions, self.inv_freq, compute_dtype(self.dtype))
        # The chunk's mask, built once for all layers as an additive mask (0 or -inf): SDPA would
        # otherwise convert a boolean mask in every layer.
        mask = None
        if T > 1 and start > 0:
            visible = chunk_mask(start, T, start + T, tokens.device)
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=tokens.device).masked_fill_(~visible, float("-inf"))

        h = self.embed_tokens(tokens)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache.k[i], cache.v[i], start, mask)
        h = self.norm(h)
        cache.length = start + T

        logits = None if logits_for is None else self.lm_head(h[:, logits_for]).to(compute_dtype(self.dtype))
        return (logits, h) if return_hidden else logits


# ---------------------------------------------------------------------------------------------
# Loading

# Weight dtypes in safetensors headers that load() converts to the model dtype. Integer tensors
# would be quantized weights, which need scales this loader does not read.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def checkpoint_to_module_name(name):
    """Map a Hugging Face tensor name to this file's parameter name.

    The modules are named after the checkpoint, so the only change is the "model." prefix; Hugging
    Face q_proj/k_proj rows are already in the rotate-half RoPE order apply_rope expects.
    """
    return name[len("model."):] if name.startswith("model.") else name


def weight_files(checkpoint_dir):
    """Return the safetensors files of a checkpoint: the index's shards, or model.safetensors.

    Pickled weights (.bin, .pth, .pt) are never read, because unpickling can run code.
    """
    index_path = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except OSError as e:
            raise CheckpointError(f"cannot read {index_path}: {e.strerror}; check its permissions") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: invalid index ({e}); download it again") from None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names; download it again")
        files = sorted(set(weight_map.values()))
        # Shards must be files in the checkpoint folder, so an index cannot point the loader elsewhere.
        outside = [name for name in files if os.path.basename(name) != name or name in ("", ".", "..")]
        if outside:
            raise CheckpointError(f"{index_path}: shard {outside[0]!r} is not a file name inside the checkpoint folder")
        missing = [name for name in files if not os.path.isfile(os.path.join(checkpoint_dir, name))]
        if missing:
            raise CheckpointError(f"{checkpoint_dir}: shard {missing[0]} named in the index is missing; download it again")
        return [os.path.join(checkpoint_dir, name) for name in files]
    single = os.path.join(checkpoint_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    pickled = sorted(name for name in os.listdir(checkpoint_dir) if name.endswith((".bin", ".pth", ".pt")))
    if pickled:
        raise CheckpointError(
            f"{checkpoint_dir} contains {pickled[0]} but no model.safetensors; this loader reads safetensors only, "
            "because unpickling can run code. Convert the weights, e.g. with transformers' save_pretrained")
    raise CheckpointError(
        f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json found; "
        "this loader reads safetensors weights only")


def read_config(checkpoint_dir):
    """Return the ModelArgs of a checkpoint folder's config.json, or raise CheckpointError."""
    if not os.path.isdir(checkpoint_dir):
        problem = "is not a folder" if os.path.exists(checkpoint_dir) else "not found"
        raise CheckpointError(f"checkpoint folder {checkpoint_dir} {problem}; pass --checkpoint with a Hugging Face model folder")
    path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found; a Hugging Face checkpoint folder needs its config.json") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must contain a JSON object; download it again")
    return ModelArgs.from_config(cfg, source=path)


def expected_shapes(args):
    """Return {parameter name: shape} of the tensors a checkpoint for args must contain."""
    model = Transformer(args, device="meta")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    if args.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_weights(checkpoint_dir, args):
    """Check every tensor's name, shape and dtype against args; return {parameter name: (file, tensor name)}.

    Reads only the safetensors headers, so a truncated, incomplete or mismatched checkpoint is
    rejected before any weight is loaded. Raises CheckpointError naming the file and tensor.
    """
    from safetensors import SafetensorError, safe_open

    files = weight_files(checkpoint_dir)
    expected = expected_shapes(args)
    found = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = checkpoint_to_module_name(key)
                    if name not in expected:
                        if args.tie_word_embeddings and name == "lm_head.weight":
                            continue  # some tied checkpoints store the shared matrix twice
                        raise CheckpointError(f"{path}: unexpected tensor {key}; is this a Llama checkpoint matching its config.json?")
                    if name in found:
                        raise CheckpointError(f"{path}: tensor {key} is also in {found[name][0]}; download the checkpoint again")
                    header = f.get_slice(key)
                    shape = tuple(header.get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(
                            f"{path}: {key} has shape {shape}, config.json implies {expected[name]}; "
                            "the weights do not belong to this config.json")
                    if header.get_dtype() not in FLOAT_DTYPES:
                        raise CheckpointError(
                            f"{path}: {key} has dtype {header.get_dtype()}, but only floating-point weights "
                            f"({', '.join(FLOAT_DTYPES)}) are supported; use an unquantized checkpoint")
                    found[name] = (path, key)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    missing = sorted(set(expected) - set(found))
    if missing:
        first = missing[0] if missing[0] == "lm_head.weight" else "model." + missing[0]
        raise CheckpointError(
            f"{checkpoint_dir}: the weights lack {len(missing)} of the tensors config.json implies, first {first}; "
            "download the checkpoint again")
    return found


def load(checkpoint_dir, device="cpu", dtype=torch.bfloat16):
    """Load a Llama checkpoint folder (config.json + safetensors) and return the model in eval mode."""
    from safetensors import SafetensorError, safe_open

    args = read_config(checkpoint_dir)
    found = check_weights(checkpoint_dir, args)
    # Parameters on the meta device take no memory until load_state_dict assigns the real tensors.
    # The device argument, unlike a `with torch.device(...)` block, does not import torch._dynamo.
    model = Transformer(args, device="meta")

    by_file = {}
    for name, (path, key) in found.items():
        by_file.setdefault(path, []).append((name, key))
    state = {}
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name, key in names:
                    state[name] = f.get_tensor(key).to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again") from None

    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()
