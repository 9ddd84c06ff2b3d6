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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from pipeline_fixtures import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


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
