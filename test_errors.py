"""Bad input and interrupted runs: each command exits with status 2 and a one-line error, without a traceback.

Every case runs a command as a subprocess, as a user would, on tiny checkpoints (2 layers, width
64, random weights, a copy of the built-in tokenizer) that the module builds once, then breaks
one way per case. The error must be the last line of stderr, start with "<script>: error:", name
the problem and the fix, and come before the model is loaded or run.

A subprocess costs 2 to 3 s on 2 CPU cores, mostly importing torch, too much to run every case
against every command. So each checkpoint case, and each text-file case, runs against one command,
rotating through COMMANDS in order: every command meets an equal share of the cases, and every
case one command. The argument, device and output cases name their commands, so that each
command is covered. Adding a command to COMMANDS adds it to the rotations.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as llama
import prepare

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Command:
    script: str
    quick: list  # arguments for a short run on a tiny checkpoint
    text_flag: str | None  # the flag that reads a UTF-8 text file, or None if the command reads none
    output_flag: str  # a flag that writes a file
    loaded: str  # stderr text printed once the model is loaded or has run; an input error must come before it
    needs_text: bool = False  # whether a run needs text_flag


COMMANDS = {
    "needle": Command("needle.py", ["--lengths", "200", "--depths", "1", "--methods", "fold", "--max-new-tokens", "2"],
                      "--haystack", "--json", "loaded "),
    "ask": Command("ask.py", ["--question", "Why?", "--max-new-tokens", "2"], "--file", "--save-cache", "loaded ",
                   needs_text=True),
    "drift": Command("drift.py", ["--tokens", "64", "--chunk-sizes", "32", "--dtypes", "fp32"], "--text", "--out",
                     "float64 one-shot reference"),
    "bench": Command("bench.py", ["--lengths", "64", "--dtypes", "fp32", "--methods", "ours-fold", "--decode-tokens", "0",
                                  "--one-process"], None, "--json", "F.linear fp32 peak"),
}
NAMES = list(COMMANDS)


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints and documents


def tiny_config():
    with open(os.path.join(prepare.ensure_builtin(log=lambda m: None), "config.json"), encoding="utf-8") as f:
        builtin = json.load(f)
    builtin.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
    return builtin


def write_tiny(folder, config):
    """Write config.json, random fp32 weights and the built-in tokenizer files into folder."""
    builtin = prepare.ensure_builtin(log=lambda m: None)
    os.makedirs(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(builtin, name), folder)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    generator = torch.Generator().manual_seed(0)
    shapes = llama.expected_shapes(llama.ModelArgs.from_config(config))
    tensors = {("" if name == "lm_head.weight" else "model.") + name: torch.randn(shape, generator=generator) * 0.02
               for name, shape in shapes.items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny") / "ckpt"), tiny_config())


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A tiny checkpoint trained, by its config, on only 128 positions."""
    return write_tiny(str(tmp_path_factory.mktemp("short") / "ckpt"), dict(tiny_config(), max_position_embeddings=128))


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    """A UTF-8 text of about 300 tokens."""
    path = tmp_path_factory.mktemp("text") / "report.txt"
    path.write_text(" ".join(["The harbour was busy in the early morning, and nobody seemed to mind."] * 20),
                    encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Running commands


def run(command, checkpoint, *extra, text=None, document=None, runner=(), timeout=120):
    """Run a command on checkpoint with its quick arguments, then extra; return the CompletedProcess."""
    argv = [os.path.join(HERE, command.script), "--checkpoint", checkpoint, *command.quick]
    if text is not None or command.needs_text:
        argv += [command.text_flag, text if text is not None else document]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, *runner, *argv, *extra], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=HERE)


def assert_error(result, command, *expected):
    """Check exit status 2, no traceback, and a last stderr line '<script>: error: ...' containing expected."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, f"exit status {result.returncode}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert lines[-1].startswith(f"{command.script}: error: "), result.stderr
    for text in expected:
        assert text in lines[-1], f"{text!r} not in the error line {lines[-1]!r}"
    assert command.loaded not in result.stderr, f"the error came after the model was loaded or run:\n{result.stderr}"


def rotate(cases, names=NAMES):
    """Pair each case with one of the commands in names, in turn, as pytest parameters."""
    return [pytest.param(*case, names[i % len(names)], id=f"{case[0]}-{names[i % len(names)]}")
            for i, case in enumerate(cases)]


# ---------------------------------------------------------------------------------------------
# Broken checkpoints


def edit_config(**changes):
    def edit(folder):
        path = os.path.join(folder, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config.update(changes)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)
    return edit


def edit_tensors(change):
    def edit(folder):
        path = os.path.join(folder, "model.safetensors")
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return edit


def write_file(name, content):
    def edit(folder):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return edit


def remove(name):
    return lambda folder: os.remove(os.path.join(folder, name))


def split_into_shards(folder):
    """Move the weights into shard 1 of 2 and write an index that also names the missing shard 2."""
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "model-00001-of-00002.safetensors"))
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)


def corrupt_header(folder):
    """Overwrite the start of the JSON header that follows the 8-byte header length."""
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"#" * 16)


class WritesMarker:
    """Unpickling this object creates the file marker: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_weights_only(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        pickle.dump(WritesMarker(os.path.join(folder, "unpickled")), f)


CHECKPOINT_CASES = [
    # (case, how to break a copy of the tiny checkpoint, texts the error line must contain)
    ("folder missing", "missing", ["not found", "--checkpoint"]),
    ("not a folder", "file", ["is not a folder", "--checkpoint"]),
    ("no config.json", remove("config.json"), ["config.json not found"]),
    ("config.json invalid JSON", write_file("config.json", b'{"hidden_size": 64,'), ["is not valid JSON", "download it again"]),
    ("unsupported architecture", edit_config(architectures=["MistralForCausalLM"], model_type="mistral"),
     ["unsupported architecture", "Llama models"]),
    ("unsupported rope_type", edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     ["rope_type 'yarn' is not supported"]),
    ("field of wrong type", edit_config(num_hidden_layers="thirty"),
     ["num_hidden_layers must be an integer, got 'thirty'", "correct config.json"]),
    ("field of invalid value", edit_config(num_key_value_heads=3),
     ["num_attention_heads 4 is not a multiple of num_key_value_heads 3", "correct config.json"]),
    ("no weight files", remove("model.safetensors"), ["no model.safetensors", "safetensors weights only"]),
    ("pickled weights only", pickle_weights_only, ["pytorch_model.bin", "safetensors only"]),
    ("index names missing shard", split_into_shards,
     ["shard model-00002-of-00002.safetensors named in the index is missing", "download it again"]),
    ("truncated safetensors", truncate, ["is not a readable safetensors file", "download it again"]),
    ("corrupt safetensors header", corrupt_header, ["is not a readable safetensors file", "download it again"]),
    ("tensor missing", edit_tensors(lambda t: t.pop("model.norm.weight")), ["model.norm.weight", "download"]),
    ("unexpected tensor", edit_tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})),
     ["unexpected tensor model.layers.0.self_attn.q_proj.bias"]),
    ("tensor of wrong shape", edit_tensors(lambda t: t.update({"model.norm.weight": torch.ones(65)})),
     ["model.norm.weight has shape (65,), config.json implies (64,)"]),
    ("int8 tensor", edit_tensors(lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)})),
     ["model.norm.weight has dtype I8", "unquantized checkpoint"]),
    ("tokenizer files missing", remove("tokenizer.json"), ["no tokenizer.json or tokenizer.model", "copy them"]),
    ("tokenizer.json invalid JSON", write_file("tokenizer.json", b'{"model": {'), ["tokenizer.json is not valid JSON"]),
    ("tokenizer.json without vocab", write_file("tokenizer.json", b'{"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}}'),
     ["tokenizer.json: model.vocab must map tokens to ids"]),
    ("tokenizer_config.json invalid JSON", write_file("tokenizer_config.json", b"{'bos_token': 1}"),
     ["tokenizer_config.json is not valid JSON"]),
]


@pytest.mark.parametrize("case, breaks, expected, name", rotate(CHECKPOINT_CASES))
def test_broken_checkpoint(tiny, document, tmp_path, case, breaks, expected, name):
    checkpoint = str(tmp_path / "ckpt")
    if breaks == "file":
        open(checkpoint, "w").close()
    elif breaks != "missing":
        shutil.copytree(tiny, checkpoint)
        breaks(checkpoint)

    result = run(COMMANDS[name], checkpoint, document=document)

    assert_error(result, COMMANDS[name], *expected)
    assert not os.path.exists(os.path.join(checkpoint, "unpickled")), "a pickle from the checkpoint was loaded"


# ---------------------------------------------------------------------------------------------
# Arguments


ARGUMENT_CASES = [
    # (case, command, extra arguments, texts the error line must contain)
    ("length zero", "needle", ["--lengths", "0"], ["--lengths must be positive"]),
    ("length negative", "drift", ["--tokens", "-64"], ["--tokens must be positive, got -64"]),
    ("chunk size zero", "ask", ["--chunk-size", "0"], ["--chunk-size must be at least 1"]),
    ("chunk size negative", "drift", ["--chunk-sizes", "32,-1"], ["--chunk-sizes must be positive"]),
    ("chunk size zero", "needle", ["--chunk-size", "0"], ["--chunk-size must be at least 1"]),
    ("depth outside 0..1", "needle", ["--depths", "0.5,1.5"], ["--depths must lie in [0, 1]"]),
    ("trials zero", "needle", ["--trials", "0"], ["--trials must be at least 1"]),
    ("unknown dtype", "needle", ["--dtype", "fp8"], ["invalid choice: 'fp8'"]),
    ("unknown dtype", "ask", ["--dtype", "int4"], ["invalid choice: 'int4'"]),
    ("unknown dtype", "drift", ["--dtypes", "fp32,fp8"], ["unknown dtype 'fp8'"]),
    ("unknown device", "needle", ["--device", "tpu"], ["unknown --device 'tpu'"]),
    ("unknown device", "ask", ["--device", "cuda:x"], ["unknown --device 'cuda:x'"]),
    ("unknown device", "drift", ["--device", "tpu"], ["unknown --device 'tpu'"]),
    ("not an integer", "needle", ["--trials", "two"], ["argument --trials: invalid int value: 'two'"]),
    ("not an integer", "ask", ["--max-new-tokens", "lots"], ["argument --max-new-tokens: invalid int value: 'lots'"]),
    ("length zero", "bench", ["--lengths", "0"], ["--lengths must be positive"]),
    ("chunk size zero", "bench", ["--chunk-size", "0"], ["--chunk-size must be at least 1"]),
    ("unknown dtype", "bench", ["--dtypes", "fp32,fp8"], ["unknown 'fp8' in --dtypes"]),
    ("unknown device", "bench", ["--device", "tpu"], ["unknown --device 'tpu'"]),
    ("not an integer", "bench", ["--decode-tokens", "some"], ["argument --decode-tokens: invalid int value: 'some'"]),
]


@pytest.mark.parametrize("case, name, extra, expected", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in ARGUMENT_CASES])
def test_bad_argument(tiny, document, case, name, extra, expected):
    result = run(COMMANDS[name], tiny, *extra, document=document)

    assert_error(result, COMMANDS[name], *expected)


def test_argparse_error_one_line_drift(tiny):
    result = run(COMMANDS["drift"], tiny, "--tokens", "many")

    assert_error(result, COMMANDS["drift"], "argument --tokens: invalid int value: 'many'")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_argparse_error_one_line_needle(tiny):
    result = run(COMMANDS["needle"], tiny, "--sinks", "few")

    assert_error(result, COMMANDS["needle"], "argument --sinks: invalid int value: 'few'", "--help")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_device_ask(tiny, document):
    result = run(COMMANDS["ask"], tiny, "--device", "cuda", document=document)

    assert_error(result, COMMANDS["ask"], "torch sees no CUDA device", "--device cpu")


@pytest.mark.parametrize("name, extra", [
    ("needle", ["--lengths", "200"]),
    ("ask", []),
    ("drift", ["--tokens", "256", "--chunk-sizes", "64"]),
    ("bench", ["--lengths", "200"]),
])
def test_length_beyond_trained_positions(short_context, document, name, extra):
    result = run(COMMANDS[name], short_context, *extra, document=document)

    assert_error(result, COMMANDS[name], "exceeds the model's 128 trained positions", "--allow-long")


def test_allow_long_warns_needle(short_context):
    result = run(COMMANDS["needle"], short_context, "--lengths", "200", "--allow-long", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "warning: --lengths 200 exceeds the model's 128 trained positions" in result.stderr
    assert "RoPE was not trained there" in result.stderr


def test_allow_long_warns_ask(short_context, document):
    result = run(COMMANDS["ask"], short_context, "--allow-long", document=document)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "warning: the document (" in result.stderr
    assert "exceeds the model's 128 trained positions (max_position_embeddings); RoPE was not trained there" in result.stderr
    assert "folded" in result.stderr


# ---------------------------------------------------------------------------------------------
# Devices, mocked: a fake CUDA device, so the checks run on machines without one


CUDA_RUNNER = '''"""Run a script with torch.cuda replaced by a fake device: python fake_cuda.py BF16 FREE_BYTES SCRIPT ARGS..."""
import runpy
import sys

import torch

bf16, free = sys.argv[1] == "1", int(sys.argv[2])
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.is_bf16_supported = lambda including_emulation=True: bf16
torch.cuda.mem_get_info = lambda device=None: (free, free)
torch.cuda.get_device_name = lambda device=None: "Fake GPU"
sys.argv = sys.argv[3:]
sys.path.insert(0, {here!r})
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def fake_cuda(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "fake_cuda.py"
    path.write_text(CUDA_RUNNER.format(here=HERE), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, extra", [
    ("needle", ["--dtype", "bf16"]),
    ("ask", ["--dtype", "bf16"]),
    ("drift", ["--dtypes", "fp32,bf16"]),
    ("bench", ["--dtypes", "fp32,bf16"]),
])
def test_bf16_on_cuda_without_bf16(tiny, document, fake_cuda, name, extra):
    result = run(COMMANDS[name], tiny, "--device", "cuda", *extra, document=document, runner=[fake_cuda, "0", str(2 ** 40)])

    assert_error(result, COMMANDS[name], "does not support bf16", "fp16")


@pytest.mark.parametrize("name", ["needle", "ask"])
def test_plan_larger_than_free_memory(tiny, document, fake_cuda, name):
    result = run(COMMANDS[name], tiny, "--device", "cuda", "--dtype", "fp32", document=document,
                 runner=[fake_cuda, "1", str(2 ** 20)])

    assert_error(result, COMMANDS[name], "the plan needs", "cuda has 0.00 GiB available")


# ---------------------------------------------------------------------------------------------
# Input and output files


TEXT_CASES = [
    # (case, file contents, or None for no file and "folder" for a folder; text the error line must contain)
    ("missing", None, "not found"),
    ("empty", b" \n\n ", "contains no text"),
    ("not UTF-8", b"caf\xe9 au lait, in latin-1.", "not UTF-8"),
    ("folder", "folder", "is a folder"),
]


@pytest.mark.parametrize("case, content, expected, name", rotate(TEXT_CASES, [n for n in NAMES if COMMANDS[n].text_flag]))
def test_bad_text_file(tiny, tmp_path, case, content, expected, name):
    path = tmp_path / "input.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)

    result = run(COMMANDS[name], tiny, text=str(path))

    assert_error(result, COMMANDS[name], str(path), expected)


OUTPUT_CASES = [
    # (case, command, output path below tmp_path; "blocker" is a file created first)
    ("folder is a file", "needle", "blocker/results.jsonl"),
    ("path is a folder", "ask", "."),
    ("folder is a file", "drift", "blocker/rows.csv"),
    ("folder is a file", "bench", "blocker/bench.json"),
]


@pytest.mark.parametrize("case, name, relative", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in OUTPUT_CASES])
def test_output_not_writable(tiny, document, tmp_path, case, name, relative):
    (tmp_path / "blocker").write_text("a file, not a folder")
    path = os.path.normpath(str(tmp_path / relative))

    result = run(COMMANDS[name], tiny, COMMANDS[name].output_flag, path, document=document)

    assert_error(result, COMMANDS[name], path)


def test_plot_path_is_folder_needle(tiny, tmp_path):
    folder = tmp_path / "heatmap.png"
    folder.mkdir()

    result = run(COMMANDS["needle"], tiny, "--plot", str(folder))

    assert_error(result, COMMANDS["needle"], "--plot", "is a folder")


# ---------------------------------------------------------------------------------------------
# Interrupted runs


# 6 fold trials of 1000 tokens in chunks of 16 on the tiny model, a few tenths of a second each on
# 2 CPU cores: long enough to interrupt the run between trials.
NEEDLE_GRID = ["--lengths", "1000", "--depths", "0,1", "--trials", "3", "--methods", "fold", "--chunk-size", "16",
               "--max-new-tokens", "4"]
GRID_SIZE = 6


def start_needle(checkpoint, results):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    argv = [sys.executable, os.path.join(HERE, "needle.py"), "--checkpoint", checkpoint, *NEEDLE_GRID, "--json", str(results)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE)


def wait_for_lines(path, n, process, timeout=120):
    """Return once path contains n newline-terminated lines; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert process.poll() is None, f"needle.py ended before writing {n} trials:\n{process.communicate()[1]}"
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"needle.py wrote fewer than {n} trials in {timeout} s")


def parse_complete_lines(path):
    """Return the JSON records of path, skipping a line that a killed run left half-written."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def test_needle_sigkill_then_rerun(tiny, tmp_path):
    results = tmp_path / "results.jsonl"
    process = start_needle(tiny, results)
    wait_for_lines(results, 2, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    lines = results.read_text(encoding="utf-8").split("\n")
    finished = [json.loads(line) for line in lines[:-1]]  # every line but a half-written last one is complete
    assert 2 <= len(finished) < GRID_SIZE, "the kill did not land midway through the run"

    rerun = subprocess.run([sys.executable, os.path.join(HERE, "needle.py"), "--checkpoint", tiny, *NEEDLE_GRID,
                            "--json", str(results)], capture_output=True, text=True, timeout=120, cwd=HERE,
                           env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))

    assert rerun.returncode == 0, rerun.stderr
    assert f"reused {len(finished)} finished trials" in rerun.stderr
    records = parse_complete_lines(results)
    assert records[:len(finished)] == finished, "finished trials were changed"
    assert len(records) == GRID_SIZE
    assert {(r["depth"], r["trial"]) for r in records} == {(d, t) for d in (0.0, 1.0) for t in range(3)}


def test_needle_ctrl_c_reports_saved(tiny, tmp_path):
    results = tmp_path / "results.jsonl"
    process = start_needle(tiny, results)
    wait_for_lines(results, 1, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    saved = len(results.read_text(encoding="utf-8").splitlines())
    assert f"new trials are saved in {results}" in stderr
    assert f"{saved} new trials" in stderr, stderr
    assert "accuracy" in stdout, "no summary table"


def test_ask_ctrl_c_reports_saved(tiny, document, tmp_path):
    cache = tmp_path / "doc.kv"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    # Without --question, ask.py reads questions from stdin, which stays open here.
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "ask.py"), "--checkpoint", tiny, "--file", document,
                                "--save-cache", str(cache)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=HERE)
    deadline = time.monotonic() + 120
    while not cache.exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.01)
    time.sleep(0.2)  # let it reach the question prompt
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"the folded document is saved in {cache}" in stderr
    assert not (tmp_path / "doc.kv.partial").exists()


# ---------------------------------------------------------------------------------------------
# prepare.py


def run_prepare(*argv):
    return subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), *argv], capture_output=True, text=True,
                          timeout=120, cwd=HERE)


PREPARE = Command("prepare.py", [], "--gguf", "--out", "wrote ")


def test_prepare_gguf_missing(tmp_path):
    result = run_prepare("--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))

    assert_error(result, PREPARE, "missing.gguf not found", "--gguf")


def test_prepare_gguf_invalid(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not a GGUF file")

    result = run_prepare("--gguf", str(gguf), "--out", str(tmp_path / "out"))

    assert_error(result, PREPARE, "is not a valid GGUF file", "--gguf")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial").exists()


def test_prepare_keeps_unrelated_folder(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("not a checkpoint")

    result = run_prepare("--out", str(tmp_path))

    assert_error(result, PREPARE, "contains files but no config.json", "--out")
    assert keep.exists()
