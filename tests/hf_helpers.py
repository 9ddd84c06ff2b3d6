"""Shared helpers for tests that build small transformers checkpoints (imported by test modules)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def randomize_(model, seed: int = 0, scale: float = 0.15) -> None:
    """Give a transformers model weights large enough that logits differ visibly between implementations.

    (Default init at std 0.02 makes every logit ~0, which would let a wrong model pass a 1e-4 check.)
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise * 3 if "embed" in name else noise)


def write_word_tokenizer(directory: Path, num_tokens: int) -> None:
    """A whitespace word-level tokenizer.json with `num_tokens` ids (0..3 special) plus tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), num_tokens)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()
