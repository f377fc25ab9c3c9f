"""Quality guard for quantized inference on the real SmolLM2-135M-Instruct Q4_1 file: perplexity on
held-out Shakespeare (what `pocketlm eval` computes) for the file kept in its blocks against the
same file dequantized to fp32, and for an fp32 checkpoint folder quantized at load (int8 within
1%, int4 within 5%); the token-by-token decode step (int8 activations), compiled or forced onto
its pure-PyTorch fallback, scores the text within 1% too and answers the demo's question.

The compiled kernels and the fallback compute the same math but round floats in different places;
where that moves an activation across an int8 rounding step inside a block that holds one of
SmolLM2's outlier features, the step is coarse and the difference shows (logits ~2% apart, each
path as far from float32 as the other). Bit-level agreement between the two is therefore tested
on a model without such outliers (tests/test_quant_decode.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pocketlm import kernels
from pocketlm.api import AutoTokenizer, CausalLM
from pocketlm.data import shakespeare_files
from pocketlm.evaluate import perplexity
from pocketlm.generate import Generator
from pocketlm.packing import QuantizedDecodeStep
from pocketlm.quant import quantized_bits

TOKENS = 1024


@pytest.fixture(scope="module")
def text_ids(smollm2_gguf):
    sonnets = next(p for p in shakespeare_files() if "sonnet" in p.name.lower())
    ids = AutoTokenizer.from_pretrained(smollm2_gguf).encode(sonnets.read_text(encoding="utf-8")[20000:40000])
    return torch.tensor(ids[:TOKENS])


@pytest.fixture(scope="module")
def fp32(smollm2_gguf):
    return CausalLM.from_pretrained(smollm2_gguf, dtype=torch.float32)


def _ppl(model, ids):
    return perplexity(model, ids, max_length=512, stride=256).perplexity


def test_perplexity_of_quantized_smollm2(smollm2_gguf, fp32, text_ids, tmp_path):
    reference = _ppl(fp32, text_ids)
    assert 5 < reference < 200  # a real language model on real text
    native = CausalLM.from_pretrained(smollm2_gguf)
    assert set(quantized_bits(native).values()) == {4, 8}
    assert abs(_ppl(native, text_ids) / reference - 1) < 0.01
    fp32.save_pretrained(tmp_path / "fp32")
    for dtype, bound in (("int8", 0.01), ("int4", 0.05)):
        model = CausalLM.from_pretrained(tmp_path / "fp32", dtype=dtype)
        assert set(quantized_bits(model).values()) == {int(dtype[3:]), 8}
        assert abs(_ppl(model, text_ids) / reference - 1) < bound, dtype


@pytest.mark.parametrize("compiled", [True, False], ids=["kernels", "fallback"])
@torch.no_grad()
def test_the_decode_step_scores_the_text_as_the_float_model_does(smollm2_gguf, fp32, text_ids, compiled):
    if compiled and kernels.compiled() is None:
        pytest.skip("the kernels could not be compiled here (no C++ compiler): only the fallback runs")
    ids = text_ids[:256]
    reference = F.cross_entropy(fp32(ids[None]).logits[0, :-1], ids[1:]).item()
    model = CausalLM.from_pretrained(smollm2_gguf)
    with kernels.use_compiled(compiled):
        step, cache = QuantizedDecodeStep.for_model(model), model.new_cache(1, len(ids))
        logits = torch.stack([step(ids[i:i + 1], torch.tensor([i]), cache)[0] for i in range(len(ids) - 1)])
    loss = F.cross_entropy(logits, ids[1:]).item()
    assert abs(math.exp(loss) / math.exp(reference) - 1) < 0.01


@pytest.mark.parametrize("compiled", [True, False], ids=["kernels", "fallback"])
@torch.no_grad()
def test_the_demo_question_is_answered_right(smollm2_gguf, compiled):
    if compiled and kernels.compiled() is None:
        pytest.skip("the kernels could not be compiled here (no C++ compiler): only the fallback runs")
    model, tokenizer = CausalLM.from_pretrained(smollm2_gguf), AutoTokenizer.from_pretrained(smollm2_gguf)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)["input_ids"]
    with kernels.use_compiled(compiled):
        out = Generator(model, tokenizer).generate_ids(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)
    assert "Paris" in tokenizer.decode(out[0, len(prompt):])
