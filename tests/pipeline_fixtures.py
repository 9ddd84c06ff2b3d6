"""A tiny model directory for pipeline tests: random 'tiny'-preset Llama + byte-level BPE tokenizer
with ChatML specials, written as a Hugging Face directory so it loads like any model source."""

from __future__ import annotations

from pathlib import Path

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
