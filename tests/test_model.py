"""The Transformer against transformers' GPT-2 and Llama on tiny random configs, the KV cache
against the full forward, and the positional encodings against their formulas."""

import math

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from conftest import TINY, randomize
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.model import Transformer, apply_rope, rope_cos_sin, sinusoidal_encoding


def hf_twin(model: Transformer, tmp_path):
    """The same weights in transformers' own model class, through a folder we saved."""
    from pocketlm.checkpoint import save_pretrained

    save_pretrained(model, tmp_path / "ckpt")
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()


def test_logits_and_loss_match_transformers(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_config)).eval()
    hf = hf_twin(model, tmp_path)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[tiny_config.family]
    ids = torch.randint(0, tiny_config.vocab_size, (3, 17))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions must not count in the mean
    with torch.no_grad():
        ours, theirs = model(ids, labels=labels), hf(ids, labels=labels)
    assert (ours.logits - theirs.logits).abs().max() <= 1e-4
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-5
    # the loss is the mean negative log-likelihood of each next token
    logp = ours.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = labels[:, 1:] != -100
    assert abs(ours.loss.item() + logp[keep].mean().item()) <= 1e-5


def test_padded_batch_matches_transformers(tiny_config, tmp_path):
    torch.manual_seed(1)
    model = randomize(Transformer(tiny_config)).eval()
    hf = hf_twin(model, tmp_path)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: real tokens keep positions 0..5
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-mha-untied", "gpt2-tied"])
def test_kv_cache_step_by_step_equals_full_forward(name):
    config = ModelConfig(**TINY[name])
    torch.manual_seed(2)
    model = randomize(Transformer(config)).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(batch_size=2, max_length=16)
        chunks = [model(ids[:, :5], cache=cache).logits]  # a prefill chunk, then single tokens
        chunks += [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 9)]
        chunks.append(model(ids[:, 9:], cache=cache).logits)  # a second multi-token chunk
    assert cache.length == 12
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-5


def test_kv_cache_with_left_padding_matches_unpadded_row():
    config = ModelConfig(**TINY["llama-gqa-tied"])
    torch.manual_seed(3)
    model = randomize(Transformer(config)).eval()
    row = torch.randint(0, config.vocab_size, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), row), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(row).logits[:, -1]
        cache = model.new_cache(1, 12)
        prefill = model(padded[:, :-1], attention_mask=mask[:, :-1], cache=cache, position_ids=positions[:, :-1])
        step = model(padded[:, -1:], attention_mask=mask, cache=cache, position_ids=positions[:, -1:]).logits[:, -1]
    assert torch.isfinite(prefill.logits).all()  # padding queries must not turn into NaN
    assert (alone - step).abs().max() <= 1e-5


def test_sinusoidal_encoding_equals_formula():
    dim, positions = 10, torch.arange(7)
    pe = sinusoidal_encoding(positions, dim)
    for pos in range(7):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_model_adds_the_encoding_to_token_embeddings():
    config = ModelConfig(**{**TINY["gpt2-tied"], "pos": "sinusoidal"})
    assert config.family == "pocketlm"
    model = Transformer(config).eval()
    seen = {}
    model.model.layers[0].input_layernorm.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    ids = torch.tensor([[5, 5, 7]])
    model(ids)
    expected = model.model.embed_tokens(ids) + sinusoidal_encoding(torch.arange(3), config.n_embd)
    assert torch.allclose(seen["x"], expected, atol=1e-6)


def test_rope_equals_transformers_rotary():
    config = ModelConfig(**TINY["llama-gqa-tied"])
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_hf_config().items() if k != "model_type"})
    rotary = modeling_llama.LlamaRotaryEmbedding(hf_config)
    positions = torch.tensor([[0, 1, 2, 7, 50, 127]])
    x = torch.randn(1, 4, 6, config.head_dim)
    hf_cos, hf_sin = rotary(x, positions)
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
    half = config.head_dim // 2  # our sin table carries rotate_half's sign in its first half
    signed_hf_sin = torch.cat((-hf_sin[..., :half], hf_sin[..., half:]), dim=-1)
    assert torch.allclose(cos[:, 0], hf_cos, atol=1e-6) and torch.allclose(sin[:, 0], signed_hf_sin, atol=1e-6)
    q, k = torch.randn(1, 4, 6, config.head_dim), torch.randn(1, 2, 6, config.head_dim)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    assert torch.allclose(apply_rope(q, cos, sin), hf_q, atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin), hf_k, atol=1e-6)


def test_tied_embeddings_share_one_tensor(tiny_config):
    model = Transformer(tiny_config)
    shared = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shared == tiny_config.tie_embeddings


def test_parameter_count_matches_transformers(tiny_config, tmp_path):
    model = Transformer(tiny_config)
    hf = hf_twin(model, tmp_path)
    assert model.num_parameters() == hf.num_parameters()


def test_smollm2_preset_has_the_published_size():
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("smollm2-135m"))
    assert model.num_parameters() == 134_515_008  # SmolLM2-135M's published parameter count


def test_bad_input_ids_give_a_clear_error():
    model = Transformer(ModelConfig(**TINY["gpt2-tied"]))
    with pytest.raises(ConfigError, match="token id 96 is outside the model's vocabulary of 96"):
        model(torch.tensor([[1, 96]]))
    with pytest.raises(ConfigError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ConfigError, match="integer ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ContextLengthError, match="context window of 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    cache = model.new_cache(1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ContextLengthError, match="KV cache holds 4 positions; 3 are used and 2 more"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa-tied"])
def test_cuda_bf16_close_to_cpu_fp32(name):
    config = ModelConfig(**TINY[name])
    model = randomize(Transformer(config)).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        gpu = model.to("cuda", torch.bfloat16)(ids.cuda()).logits.float().cpu()
    assert (gpu - ref).abs().max() <= 0.1 * ref.abs().max()
