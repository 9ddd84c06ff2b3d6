"""For pipeline tests: a tiny model directory (random 'tiny'-preset Llama + byte-level BPE tokenizer with
ChatML specials, written as a Hugging Face directory so it loads like any model source) and `cairl train`
on configs/tiny.yaml as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_EVAL = "eval.train_models=[]"  # for tests about something else: evaluation adds ~20 s to a tiny run
NO_PERIODIC_SAVES = "checkpoint.every_steps=1000"  # so every checkpoint inside a stage comes from a signal
# The session's reference run (tests/conftest.py `reference_run`): a whole evaluated run, planned first. Runs
# compared with it use the same overrides (test_run_faults.py).
REFERENCE = (NO_PERIODIC_SAVES, "run.preflight=true")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 320


def _corpus() -> list[str]:
    words = ("the a to how do i you can help with harm safe answer question please explain why not illegal "
             "critique revision response assistant human principle better choose option").split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]


def write_tiny_model(directory: Path, seed: int = 0, **config_changes) -> Path:
    """`config_changes` override fields of the 'tiny' preset (e.g. a longer context)."""
    import jax
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from models.config import PRESETS
    from models.export import export_params
    from models.llama import Llama
    from models.sources import model_params
    from models.tokenizer_hf import HFTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = HFTokenizer(backend, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|im_end|>",
                            chat_template=CHATML, add_bos_token=False)
    config = PRESETS["tiny"].replace(vocab_size=VOCAB, **config_changes)
    with jax.default_device(jax.devices("cpu")[0]):
        model = Llama(config, nnx.Rngs(seed))
        params = model_params(model)
    return export_params(directory, config, params, tokenizer)


def train_command(model_dir, runs_dir, *overrides):
    return [sys.executable, "-m", "trainer.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"model.source={model_dir}", f"run.runs_dir={runs_dir}",
            f"ray.temp_dir={tempfile.mkdtemp(prefix='cr', dir='/tmp')}", *overrides]


def run_train(model_dir, runs_dir, *overrides, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(train_command(model_dir, runs_dir, *overrides), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
