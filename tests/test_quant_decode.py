"""Decoding a quantized model: one kernel call per layer (packing.QuantizedDecodeStep) computes
what the model's own forward computes with the same blocks; a row's logits are the same bits
whatever else is in the batch and however many threads run; the forced pure-PyTorch fallback
gives the same greedy tokens and logits within 1e-3 as the compiled kernels."""

import copy

import pytest
import torch

from conftest import TINY, randomize
from pocketlm import ModelConfig, kernels
from pocketlm.api import CausalLM
from pocketlm.errors import ConfigError
from pocketlm.generate import Generator
from pocketlm.packing import QuantizedDecodeStep
from pocketlm.quant import quantize_model

# rows of whole blocks everywhere; SmolLM2's grouping of 3 query heads per key/value head
CONFIG = {**TINY["llama-gqa-tied"], "n_head": 6, "n_kv_head": 2, "n_embd": 64, "head_dim": 16,
          "intermediate_size": 96, "max_position": 512}


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def model(request):
    torch.manual_seed(0)
    m = CausalLM.from_config(ModelConfig(**CONFIG)).eval()  # initialised as for training: well-conditioned
    quantize_model(m, request.param)
    return m


def _prefilled(model, rows, length, cache_len=64):
    """A cache holding `rows` random prompts of `length` tokens, each prefilled on its own."""
    cache = model.new_cache(rows, cache_len)
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 96, (rows, length), generator=g)
    for r in range(rows):
        one = model.new_cache(1, cache_len)
        model(ids[r:r + 1], cache=one)
        for buffers, own in ((cache.keys, one.keys), (cache.values, one.values)):
            for layer, buffer in enumerate(buffers):
                buffer[r] = own[layer][0]
    cache.length = length
    return cache


@torch.no_grad()
def test_the_fused_step_computes_what_the_model_computes(model):
    step = QuantizedDecodeStep.for_model(model)
    assert step is not None
    cache, reference = _prefilled(model, 3, 7), _prefilled(model, 3, 7)
    tokens = torch.tensor([5, 17, 90])
    for i in range(4):
        positions = torch.full((3,), 7 + i)
        got = step(tokens, positions, cache)
        expected = model(tokens[:, None], cache=reference, position_ids=positions[:, None]).logits[:, -1]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert cache.length == reference.length == 8 + i
        for a, b in zip(cache.keys + cache.values, reference.keys + reference.values):
            # float16 caches (the default): a value on a rounding boundary may land one step apart
            torch.testing.assert_close(a[:, :, :cache.length], b[:, :, :cache.length])
        tokens = got.argmax(-1)


@torch.no_grad()
def test_a_rows_logits_do_not_depend_on_its_batch_or_the_threads(model):
    step = QuantizedDecodeStep.for_model(model)
    threads = torch.get_num_threads()
    try:
        alone = []
        for r in range(8):
            cache = _prefilled(model, 8, 9)
            cache.keys, cache.values = [k[r:r + 1].clone() for k in cache.keys], [v[r:r + 1].clone() for v in cache.values]
            alone.append(step(torch.tensor([r * 11]), torch.tensor([9]), cache)[0])
        for count, rows in ((1, 8), (2, 8), (3, 5), (2, 2)):
            torch.set_num_threads(count)
            cache = _prefilled(model, 8, 9)
            cache.keys, cache.values = [k[:rows] for k in cache.keys], [v[:rows] for v in cache.values]
            logits = step(torch.arange(rows) * 11, torch.full((rows,), 9), cache)
            for r in range(rows):
                assert torch.equal(logits[r], alone[r]), (count, rows, r)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def test_generation_through_the_fallback_matches_the_compiled_kernels(model):
    if kernels.compiled() is None:
        pytest.skip("the kernels could not be compiled here (no C++ compiler): only the fallback runs")
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(2))
    runs = {}
    for compiled in (True, False):
        with kernels.use_compiled(compiled):
            out = Generator(model).generate_ids(ids, do_sample=False, max_new_tokens=12, eos_token_id=None,
                                                output_scores=True, return_dict_in_generate=True)
        runs[compiled] = out
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].scores, runs[False].scores):
        assert (a - b).abs().max() <= 1e-3 * b.abs().max()


@torch.no_grad()
def test_a_float16_cache_is_the_default_and_stays_close_to_float32(model):
    step = QuantizedDecodeStep.for_model(model)
    assert model.kv_cache_dtype == torch.float16  # a quantized model on CPU, as llama.cpp's default
    half = _prefilled(model, 2, 5)
    model.kv_cache_dtype = torch.float32
    try:
        full = _prefilled(model, 2, 5)  # prefilled through the model's forward into a float32 cache
    finally:
        model.kv_cache_dtype = torch.float16
    assert full.keys[0].dtype == torch.float32 and half.values[0].dtype == torch.float16
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        model.kv_cache_dtype = torch.bfloat16
    tokens = torch.tensor([3, 4])
    for i in range(3):
        a = step(tokens, torch.full((2,), 5 + i), full)
        b = step(tokens, torch.full((2,), 5 + i), half)
        assert half.keys[0].dtype == torch.float16
        assert (a - b).abs().max() <= 1e-2 * a.abs().max()
        tokens = a.argmax(-1)


def test_the_step_applies_only_where_it_can():
    m = randomize(CausalLM.from_config(ModelConfig(**CONFIG))).eval()
    with torch.no_grad():
        assert QuantizedDecodeStep.for_model(m) is None  # float weights: the packed float step runs
        assert m.kv_cache_dtype == torch.float32  # a float model's caches keep its dtype
        quantize_model(m, 8)
        assert QuantizedDecodeStep.for_model(m) is not None
    assert QuantizedDecodeStep.for_model(m) is None  # grad on
    gpt2 = copy.deepcopy(CausalLM.from_config(ModelConfig(**{**TINY["gpt2-tied"], "n_embd": 64})))
    with torch.no_grad():
        quantize_model(gpt2, 8)
        assert QuantizedDecodeStep.for_model(gpt2) is None  # learned positions, GELU: per-op path
        ids = torch.tensor([[1, 2, 3]])
        assert Generator(gpt2).generate_ids(ids, do_sample=False, max_new_tokens=3).shape == (1, 6)
