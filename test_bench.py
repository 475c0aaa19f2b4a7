"""Tests of bench.py: its FLOP count against torch's counter, and a small run end to end."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import model


def tiny_args():
    return model.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, hidden_dim=128, vocab_size=97,
                           norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256, tie_word_embeddings=False)


def counted_flops(llm, tokens, cache):
    """Return (weight matmul FLOPs, attention FLOPs) of one forward, as torch's FlopCounterMode counts them."""
    # FlopCounterMode does not count the CPU's fused attention kernels, so attention runs as the
    # plain math implementation here: its two batched matmuls (aten.bmm) are the attention FLOPs.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        llm(tokens, cache)
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = flops.pop("aten.bmm", 0)
    return sum(flops.values()), attention


@pytest.mark.parametrize("n_tokens,start", [(1, 0), (1, 40), (16, 0), (16, 40)])
def test_flop_count_matches_torch_counter(n_tokens, start):
    a = tiny_args()
    torch.manual_seed(0)
    llm = model.Transformer(a).eval()
    cache = llm.new_cache(start + n_tokens)
    with torch.inference_mode():
        if start:
            llm(torch.randint(a.vocab_size, (1, start)), cache)
        linear, attention = counted_flops(llm, torch.randint(a.vocab_size, (1, n_tokens)), cache)

    ours_linear, ours_attention = bench.linear_flops(a, n_tokens), bench.attention_flops(a, n_tokens, start)
    print(f"{n_tokens} tokens after {start}: weight matmuls counted {linear}, ours {ours_linear}; "
          f"attention counted {attention}, ours {ours_attention}")
    assert linear == ours_linear
    # torch counts every query against every key the kernel is given, while bench.py counts only
    # the keys each query attends to. The two agree for a single query.
    assert attention == 4 * a.head_dim * a.n_heads * a.n_layers * n_tokens * (start + n_tokens)
    if n_tokens == 1:
        assert ours_attention == attention


def test_small_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"

    bench.main(["--lengths", "48,96", "--dtypes", "fp32", "--methods", "ours-oneshot,ours-fold", "--one-process",
                "--chunk-size", "32", "--decode-tokens", "3", "--decode-from", "40", "--json", str(out)])

    result = json.loads(out.read_text())
    rows = {(r["method"], r["tokens"]) for r in result["rows"]}
    assert rows == {("ours-oneshot", 48), ("ours-fold", 48), ("ours-oneshot", 96), ("ours-fold", 96), ("ours-decode", 3)}
    for r in result["rows"]:
        assert r["seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["peak_bytes"] > 0
    decoded = next(r for r in result["rows"] if r["method"] == "ours-decode")["decoded"]
    assert len(decoded) == 3
    names = [c["target"] for c in result["targets"]]
    assert "fp32 96: ours-fold time / ours-oneshot time" in names
    assert "targets:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--lengths", "0"], "--lengths must be positive"),
    (["--dtypes", "fp8"], "unknown 'fp8' in --dtypes"),
    (["--methods", "vllm"], "unknown 'vllm' in --methods"),
    (["--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["--lengths", "9000"], "exceeds the model's 8192 trained positions"),
])
def test_bad_arguments_rejected(argv, message, tmp_path):
    with pytest.raises(bench.UsageError, match=message):
        bench.main(argv + ["--json", str(tmp_path / "b.json")])


def test_random_config_without_checkpoint(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "vocab_size": 97, "tie_word_embeddings": False,
              "rope_theta": 10000.0}
    (tmp_path / "shape.json").write_text(json.dumps(config))  # not config.json: transformers must read this file too
    out = tmp_path / "bench.json"

    bench.main(["--random-config", str(tmp_path / "shape.json"), "--lengths", "64", "--dtypes", "bf16",
                "--methods", "ours-fold,hf-oneshot", "--chunk-size", "16", "--decode-tokens", "2", "--decode-from", "32",
                "--one-process", "--json", str(out)])

    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["tokens"]) for r in rows] == [("ours-fold", 64), ("ours-decode", 2), ("hf-oneshot", 64), ("hf-decode", 2)]
    assert all(r["weights_bytes"] == bench.memory.count_parameters(bench.llama.ModelArgs.from_config(config)) * 2 for r in rows)
