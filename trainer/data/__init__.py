"""Prompt sets and evaluation data: JSONL prompt files, TFDS builders, the shipped default prompts."""

from trainer.data.load import DEFAULT_SETS, PreferencePair, load_bbq, load_prompt_set, load_response_pairs
from trainer.data.records import Prompt, PromptFileError, read_prompt_file, stable_uid

__all__ = ["DEFAULT_SETS", "PreferencePair", "Prompt", "load_bbq", "PromptFileError", "load_prompt_set", "load_response_pairs", "read_prompt_file", "stable_uid"]
