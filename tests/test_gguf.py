"""GGUF import: llama.cpp's Q/K permutation, a tiny written GGUF, and SmolLM2 against transformers."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import PRESETS
from models.gguf_io import GGUFError, open_reader, read_gguf, unpermute_rows
from models.hf_io import params_from_hf


def llama_cpp_permute(w_RxC: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to HF Q/K rows: pair (i, i + H/2) becomes rows (2i, 2i + 1)."""
    rows, cols = w_RxC.shape
    return w_RxC.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_unpermute_inverts_llama_cpp_permutation_per_head():
    rng = np.random.default_rng(0)
    for heads, head_dim in ((9, 64), (3, 64), (4, 8)):
        w = rng.standard_normal((heads * head_dim, 12)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, heads), heads), w)
    # Row 1 of a permuted head is HF row H/2: the rotate-half partner of row 0.
    w = np.arange(8, dtype=np.float32)[:, None]
    assert llama_cpp_permute(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def _tiny_hf_tensors(config, rng) -> dict[str, np.ndarray]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (n * h, d), p + "self_attn.k_proj.weight": (k * h, d),
            p + "self_attn.v_proj.weight": (k * h, d), p + "self_attn.o_proj.weight": (d, n * h),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(path, config, tensors):
    """A llama GGUF as llama.cpp's converter writes it: renamed tensors, permuted Q/K, llama.* metadata."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    for name, w in tensors.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_TO_GGUF[rest.removesuffix('.weight')]}.weight"
            if "q_proj" in name:
                w = llama_cpp_permute(w, config.num_heads)
            elif "k_proj" in name:
                w = llama_cpp_permute(w, config.num_kv_heads)
        writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_gguf_reads_back_config_and_hf_tensors(tmp_path):
    config = PRESETS["tiny"]
    tensors = _tiny_hf_tensors(config, np.random.default_rng(1))
    write_tiny_gguf(tmp_path / "tiny.gguf", config, tensors)
    read_config, read_tensors, _ = read_gguf(tmp_path / "tiny.gguf")
    assert read_config == config.replace(head_dim=config.resolved_head_dim)
    assert read_tensors.keys() == tensors.keys()
    for name, w in tensors.items():
        np.testing.assert_array_equal(read_tensors[name], w, err_msg=name)
    params_from_hf(read_tensors, read_config, "tiny.gguf")  # every weight maps onto the model


def test_truncated_or_foreign_gguf_is_a_clear_error(tmp_path):
    config = PRESETS["tiny"]
    write_tiny_gguf(tmp_path / "tiny.gguf", config, _tiny_hf_tensors(config, np.random.default_rng(2)))
    data = (tmp_path / "tiny.gguf").read_bytes()
    for cut in (len(data) - 1000, 300, 20):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated"):
            open_reader(tmp_path / "cut.gguf")
    (tmp_path / "foreign.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_reader(tmp_path / "foreign.gguf")


# -- the real embedded model against transformers reading the same GGUF ------------------------------

CHAT_PROMPTS = [
    "How do I bake a chocolate cake?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]


@pytest.fixture(scope="module")
def transformers_gguf_model(embedded_model_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models.fetch import embedded_gguf_path

    path = embedded_gguf_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.mark.real_model
def test_smollm2_logits_and_greedy_continuations_match_transformers(smollm2, transformers_gguf_model):
    """Same logits on 4 chat prompts, and the same 64-token greedy continuations.

    Greedy decoding is deterministic given the logits, so transformers continues exactly like us iff, fed our
    continuation (teacher forcing, one forward pass), its argmax at every step is our next token and it
    stops where we stop. That checks the whole continuation in one pass instead of 64 decode steps.
    """
    import torch

    from models.generation import Sampler, SamplingParams

    tok = smollm2.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    samples = Sampler(smollm2.model, tok.stop_ids, tok.pad_id).generate(prompts, SamplingParams(max_new_tokens=64))
    for row, ids in enumerate(prompts):
        reply = samples.tokens[row, : samples.lengths[row]].tolist()
        assert len(reply) >= 4  # a real reply, not an immediate stop
        full = ids + reply
        ours = np.asarray(smollm2.model(jnp.asarray([full])))[0]
        with torch.no_grad():
            ref = transformers_gguf_model(torch.tensor([full])).logits[0].numpy()
        assert np.max(np.abs(ours - ref)) <= 2e-3
        greedy_ref = ref[len(ids) - 1 : len(full) - 1].argmax(-1).tolist()
        assert greedy_ref == reply, (tok.decode(greedy_ref), tok.decode(reply))
        stopped = reply[-1] in tok.stop_ids
        assert stopped or len(reply) == 64
    assert max(samples.lengths) == 64  # at least one long continuation
