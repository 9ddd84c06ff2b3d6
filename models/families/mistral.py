"""Mistral: Llama's names; its sliding window caps the context (within the window, sliding attention
is full causal attention). Its GGUF files say architecture 'llama' and load as Llama."""

import dataclasses

from models.families.llama import LLAMA

MISTRAL = dataclasses.replace(LLAMA, name="mistral", hf_architecture="MistralForCausalLM", hf_model_type="mistral",
                              gguf_architecture=None, sliding_window_caps_context=True,
                              hf_config_extras={"sliding_window": None})
