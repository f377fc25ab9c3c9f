"""Quantized linear layers (issue 12, first step): GGUF Q8_0 / Q4_0 / Q4_1 blocks repack into
pocketlm's int8 / int4 layout holding exactly the weights `gguf` dequantizes; quantizing a float
weight stays within half a step of it; the layer computes x Wᵀ + b with the dequantized weight."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from pocketlm.errors import FormatError
from pocketlm.quant import BLOCK, QuantizedEmbedding, QuantizedLinear, from_gguf_blocks, quantize


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_repack_to_exactly_the_same_weights(kind):
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((24, 96)) * rng.uniform(0.01, 2, (24, 1))).astype(np.float32)
    weights[3, :32] = 0  # an all-zero block
    raw = quants.quantize(weights, GGMLQuantizationType[kind])
    expected = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind])).reshape(24, 96)
    layer = from_gguf_blocks(raw.reshape(-1), kind, (24, 96))
    assert layer.bits == (8 if kind == "Q8_0" else 4)
    assert torch.equal(layer.dequantize(), expected)
    x = torch.randn(20, 96)  # more rows than KERNEL_ROWS: int16 activations
    assert (layer(x) - x @ expected.T).abs().max() <= 2e-4 * (x @ expected.T).abs().max()
    _close_to_int8_activations(layer(x[:5]), x[:5] @ expected.T)  # a few rows: int8 activations


def _close_to_int8_activations(got, exact):
    """Within what quantizing activations to int8 per block (steps of max|x| / 127) can move a
    product: each activation by up to half a step."""
    assert (got - exact).abs().max() <= 0.01 * exact.abs().max() + 1e-6


def _close_to_int16_activations(got, exact):
    """Within what quantizing activations to int16 per block (steps of max|x| / 32767: each
    product within ~1e-4 of its size) can move a whole model's logits, a few layers deep."""
    assert (got - exact).abs().max() <= 2e-3 * exact.abs().max() + 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_stay_within_half_a_step(bits):
    torch.manual_seed(0)
    weight = torch.randn(16, 128) * torch.rand(16, 1) * 3
    weight[0, :BLOCK] = 0.25  # a constant block
    bias = torch.randn(16)
    layer = quantize(weight, bits, bias)
    blocks = weight.view(16, -1, BLOCK)
    spread = blocks.abs().amax(-1) / 127 if bits == 8 else (blocks.amax(-1) - blocks.amin(-1)) / 15
    error = (layer.dequantize() - weight).view(16, -1, BLOCK).abs().amax(-1)
    # half a step, plus what float16 rounding of the scale (and offset) moves the grid by
    assert torch.all(error <= spread * 0.51 + blocks.abs().amax(-1) * 2e-3 + 1e-6)
    if bits == 4:  # a constant block is its offset, exactly
        assert torch.equal(layer.dequantize()[0, :BLOCK], weight[0, :BLOCK])
    x = torch.randn(3, 7, 128)  # 21 rows: int16 activations
    assert (layer(x) - F.linear(x, layer.dequantize(), bias)).abs().max() <= 2e-4 * layer(x).abs().max()
    _close_to_int8_activations(layer(x[0]), F.linear(x[0], layer.dequantize(), bias))
    state = layer.state_dict()
    again = QuantizedLinear(128, 16, bits, bias)
    again.load_state_dict(state)
    assert torch.equal(again(x), layer(x))


def test_refusals():
    with pytest.raises(FormatError, match="divisible by 32"):
        QuantizedLinear(40, 8, 8)
    with pytest.raises(FormatError, match="do not repack losslessly"):
        from_gguf_blocks(np.zeros(10, np.uint8), "Q4_K", (1, 256))
    with pytest.raises(FormatError, match="do not hold"):
        from_gguf_blocks(np.zeros(33, np.uint8), "Q8_0", (1, 32))


@pytest.mark.parametrize("name", ["llama-gqa-tied", "gpt2-untied"])
def test_a_quantized_model_follows_its_float_model(name):
    from conftest import TINY, randomize
    from pocketlm import ModelConfig
    from pocketlm.api import CausalLM
    from pocketlm.quant import quantize_model

    config = ModelConfig(**{**TINY[name], "n_embd": 64, "head_dim": 16 if "llama" in name else None,
                            "intermediate_size": 128})
    model = randomize(CausalLM.from_config(config)).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        floats = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
        replaced = quantize_model(model, 8)
        # the block projections, and the embedding and head (one table when tied)
        assert replaced == config.n_layer * (7 if "llama" in name else 6) + (1 if config.tie_embeddings else 2)
        assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and model.model.embed_tokens.bits == 8
        assert (model.lm_head.q is model.model.embed_tokens.q) == config.tie_embeddings
        for n, m in model.named_modules():  # each replaced layer holds its own weight, quantized...
            if isinstance(m, QuantizedLinear) and n in floats:
                assert torch.allclose(m.dequantize(), floats[n], atol=floats[n].abs().max().item() / 100)
                reference.get_submodule(n).weight.copy_(m.dequantize())
        # ...and the model computes what the float model computes with those weights (24 rows:
        # int16 activations)
        _close_to_int16_activations(model(ids).logits, reference(ids).logits)
        # decoding goes through the block kernels (int8 activations): each step's logits stay near
        # what the float model gives for the same tokens (this random model, norm weights of either
        # sign, amplifies the rounding; SmolLM2's perplexity is the real check: test_quant_quality)
        out = model.generate(ids[:1], max_new_tokens=6, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        expected = reference(out.sequences).logits[0, ids.shape[1] - 1:-1]
        for step, scores in enumerate(out.scores):
            assert (scores[0] - expected[step]).abs().max() <= 0.1 * expected[step].abs().max(), step
