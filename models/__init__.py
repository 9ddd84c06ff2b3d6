"""cairl model code: Llama-family decoder in Flax NNX, tokenizers, sampler, checkpoint import/export.

Nothing in this package knows about Ray, runs or training stages.
"""
