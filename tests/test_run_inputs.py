"""What a user can point cairl at stays contained: run.name is a plain name, safetensors shards stay inside
the model directory, and `cairl export` replaces only a directory it wrote itself."""

import json
import os
from pathlib import Path

import pytest

from models import hf_io
from models.export import EXPORT_MARKER, ExportError, export_params
from models.safetensors_io import SafetensorsError

ROOT = Path(__file__).resolve().parents[1]


def test_run_name_dot_dot_fails_before_anything_is_written(tmp_path):
    from test_config import _assert_clean_failure, _run_cli

    proc = _run_cli(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "run.name=..",
                     f"run.runs_dir={tmp_path / 'runs'}"], tmp_path)
    _assert_clean_failure(proc, "run.name '..'", "plain directory name")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even runs/


@pytest.mark.parametrize("name", [".", "a/b", "../x", ""])
def test_run_name_must_be_a_plain_name(name):
    from trainer.config import load_run_config
    from trainer.configlib import ConfigError

    with pytest.raises(ConfigError, match="run.name"):
        load_run_config(None, [f"run.name={name}"])


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "link.safetensors"])
def test_an_index_cannot_name_shards_outside_the_model_directory(tmp_path, shard):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    os.symlink("/etc/hostname", model / "link.safetensors")
    (model / hf_io.INDEX_FILE).write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}))
    with pytest.raises(SafetensorsError, match="outside the model directory"):
        hf_io.weight_files(model)


def test_export_replaces_only_a_directory_it_wrote(tiny_model, tmp_path):
    from models.sources import load_checkpoint

    ckpt = load_checkpoint(str(tiny_model))
    foreign = tmp_path / "someone-elses-model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")  # looks like a model, but cairl did not write it
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="was not written by cairl export"):
        export_params(foreign, ckpt.config, ckpt.params, ckpt.tokenizer)
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json", "notes.txt"]
    out = export_params(tmp_path / "hf", ckpt.config, ckpt.params, ckpt.tokenizer)
    assert (out / EXPORT_MARKER).is_file()
    (out / "stale.txt").write_text("from the previous export")
    export_params(out, ckpt.config, ckpt.params, ckpt.tokenizer, dtype="bfloat16")  # its own: replaced whole
    assert not (out / "stale.txt").exists() and json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "someone-elses-model"]  # no temporaries left


def _train_cli(tmp_path, model, *overrides):
    from test_config import _run_cli

    return _run_cli(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"model.source={model}",
                     f"run.runs_dir={tmp_path / 'runs'}", *overrides], tmp_path)


def test_a_truncated_model_fails_before_anything_starts_or_is_written(tiny_model, tmp_path):
    import shutil

    from test_config import _assert_clean_failure

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    _assert_clean_failure(_train_cli(tmp_path, broken), "model.source", "truncated")
    assert not (tmp_path / "runs").exists()  # so the corrected re-run under the same name is not refused


@pytest.mark.parametrize("text, expected", [("bad \ud800 surrogate", "U+D800"), ("bell \x07 here", "U+0007")])
def test_non_text_prompts_are_rejected_with_file_and_line(tiny_model, tmp_path, text, expected):
    from test_config import _assert_clean_failure

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": text}) + "\n")
    _assert_clean_failure(_train_cli(tmp_path, tiny_model, f"data.prompts=[{prompts}]"), str(prompts), "line 2",
                          expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["eval.suites=[harmless,bbq]"], ["bbq", "data_dir"]),
    (["eval.suites=[harmless]", "eval.prompts={harmless: EMPTY}"], ["EMPTY", "no prompts"]),
    (["eval.judge=/nowhere/judge-model"], ["eval.judge", "/nowhere/judge-model"]),
])
def test_bad_evaluation_input_fails_before_anything_starts_or_is_written(tiny_model, tmp_path, overrides, expected):
    from test_config import _assert_clean_failure

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    expected = [e.replace("EMPTY", str(empty)) for e in expected]
    _assert_clean_failure(_train_cli(tmp_path, tiny_model, *overrides), *expected)
    assert not (tmp_path / "runs").exists()


LONG = " ".join(f"word{i % 50} please explain" for i in range(3400))  # ~10,000 tokens of the tiny tokenizer


def test_an_over_long_prompt_is_refused_at_load_with_reject(tiny_model, tmp_path):
    from test_config import _assert_clean_failure

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "short one"}) + "\n" + json.dumps({"prompt": LONG, "uid": "long"}) + "\n")
    _assert_clean_failure(_train_cli(tmp_path, tiny_model, f"data.prompts=[{prompts}]", "data.long_prompts=reject"),
                          "long from prompts", "data.max_prompt_tokens = 64", "data.long_prompts: truncate")
    assert not (tmp_path / "runs").exists()


def test_truncate_keeps_the_end_of_an_over_long_prompt_within_the_budget(tiny_model):
    from models.tokenizer import load_tokenizer
    from trainer.data.records import Prompt
    from trainer.preflight import fit_prompts
    from trainer.prompts import prompt_messages

    tokenizer = load_tokenizer(tiny_model)
    assert len(tokenizer.encode(LONG)) > 10_000
    short, long = Prompt("s", "short one", "f"), Prompt("long", LONG + " the end", "f")
    fitted = fit_prompts([short, long], tokenizer, 64, "truncate")
    assert fitted[0] == short and fitted[1].uid == "long" and fitted[1].text.endswith("the end")
    assert 56 <= len(tokenizer.encode_chat(prompt_messages(fitted[1].text))) <= 64
    assert fit_prompts([short, long], tokenizer, 64, "truncate") == fitted  # decided the same on every resume
