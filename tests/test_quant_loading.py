"""Loading quantized: GGUF files keep their blocks for inference (Q8_0 / Q4_0 / Q4_1 repacked
exactly, K-quants requantized to int8 within half a step), float checkpoints quantize at load with
dtype="int8" / "int4", quantized models save and load as safetensors, and every path that trains
or converts gets float weights."""

import json
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from conftest import TINY, randomize
from pocketlm import ModelConfig
from pocketlm.api import CausalLM
from pocketlm.errors import ConfigError, FormatError
from pocketlm.gguf import GGUFFile, load_gguf, quantized_state_from_gguf
from pocketlm.quant import QuantizedEmbedding, QuantizedLinear, quantized_bits
from test_gguf import _llama_gguf
from test_quant import _close_to_int16_activations

# a Llama whose every matrix has rows of whole blocks (n_embd 64, heads of 16)
CONFIG = {**TINY["llama-gqa-tied"], "n_embd": 64, "head_dim": 16, "intermediate_size": 96}


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tiny(request):
    config = ModelConfig(**{**CONFIG, "tie_embeddings": request.param})
    return randomize(CausalLM.from_config(config), seed=3).eval()


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_0, Q.Q8_0])
def test_a_quantized_gguf_keeps_exactly_its_weights_in_blocks(tiny, qtype, tmp_path):
    path = _llama_gguf(tmp_path / "m.gguf", tiny, qtype=qtype)
    model, floats = load_gguf(path), load_gguf(path, dtype=torch.float32)
    bits = 8 if qtype == Q.Q8_0 else 4
    expected = {f"model.layers.{i}.{p}": bits for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    expected.update({"model.embed_tokens": bits} if tiny.config.tie_embeddings else
                    {"model.embed_tokens": bits, "lm_head": bits})
    assert quantized_bits(model) == expected
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and not list(model.parameters())[0].requires_grad
    assert quantized_bits(floats) == {}
    plain = dict(floats.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):  # the float load's weights, to the bit, q/k rows included
            assert torch.equal(module.dequantize(), plain[name].weight), name
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close_to_int16_activations(model(ids).logits, floats(ids).logits)
    assert model.num_parameters() == floats.num_parameters() == tiny.num_parameters()


def _k_blocks(qtype, rows, cols, seed):
    """Random raw K-quant blocks with finite float16 scales (gguf cannot quantize K types)."""
    kind_bytes = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // 256, kind_bytes), dtype=np.uint8)
    halves = rng.uniform(-0.05, 0.05, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    at = kind_bytes - 2 if qtype == Q.Q6_K else 0  # Q6_K keeps its one scale at the end
    raw[:, at:at + 4 if qtype != Q.Q6_K else at + 2] = halves[:, :4 if qtype != Q.Q6_K else 2]
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_are_requantized_to_int8_within_half_a_step(qtype, tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch="llama")
    raws = {"blk.0.ffn_up.weight": _k_blocks(qtype, 24, 512, 0), "blk.0.attn_k.weight": _k_blocks(qtype, 32, 256, 1)}
    for name, raw in raws.items():
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = SimpleNamespace(family="llama", n_head=4, n_kv_head=2)
    with GGUFFile(tmp_path / "k.gguf") as f:
        tensors, bits = quantized_state_from_gguf(f, config)
    assert bits == {"model.layers.0.mlp.up_proj": 8, "model.layers.0.self_attn.k_proj": 8}
    for ours, name in (("model.layers.0.mlp.up_proj", "blk.0.ffn_up.weight"),
                       ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight")):
        rows, cols = raws[name].shape[0], {"blk.0.ffn_up.weight": 512, "blk.0.attn_k.weight": 256}[name]
        expected = torch.from_numpy(gguf.quants.dequantize(raws[name], qtype).reshape(rows, cols).copy())
        if "attn_k" in name:  # llama.cpp's pairwise row order of keys, undone as for every other type
            expected = expected.view(2, 8, 2, cols).transpose(1, 2).reshape(rows, cols)
        layer = QuantizedLinear(cols, rows, 8)
        layer.load_state_dict({part: tensors[f"{ours}.{part}"] for part in ("q", "scale")})
        step = expected.view(rows, -1, 32).abs().amax(-1, keepdim=True) / 127
        error = (layer.dequantize().view(rows, -1, 32) - expected.view(rows, -1, 32)).abs()
        assert torch.all(error <= step * 0.51 + step * 127 * 2e-3), ours  # + float16 rounding of the scale


@pytest.mark.parametrize("bits", [8, 4])
def test_float_checkpoints_quantize_at_load_and_quantized_ones_round_trip(tiny, bits, tmp_path):
    tiny.save_pretrained(tmp_path / "float")
    model = CausalLM.from_pretrained(tmp_path / "float", dtype=f"int{bits}")
    assert set(quantized_bits(model).values()) == {bits, 8}  # layers at `bits`, embedding and head int8
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, got = tiny(ids).logits, model(ids).logits
    # this random model (norm weights of either sign) amplifies each layer's error (int8 ~0.6% of a
    # weight's spread, int4 ~10%) several times over; real models do not: see the perplexity checks
    assert (got - reference).norm() < (0.08 if bits == 8 else 0.6) * reference.norm()

    for exclude_embeddings in (False, True):  # counted as the float model's, a tied head once
        assert model.num_parameters(exclude_embeddings=exclude_embeddings) == \
            tiny.num_parameters(exclude_embeddings=exclude_embeddings)
    model.save_pretrained(tmp_path / "quantized")
    config = json.loads((tmp_path / "quantized" / "config.json").read_text())
    assert config["quantization_config"]["modules"] == quantized_bits(model)
    again = CausalLM.from_pretrained(tmp_path / "quantized")
    assert quantized_bits(again) == quantized_bits(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)
        floats = CausalLM.from_pretrained(tmp_path / "quantized", dtype=torch.float32)  # dequantized
        assert quantized_bits(floats) == {} and floats.model.layers[0].mlp.up_proj.weight.requires_grad
        _close_to_int16_activations(got, floats(ids).logits)


def test_bad_dtypes_and_quantization_configs(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="'int4'"):
        CausalLM.from_pretrained(tmp_path / "m", dtype="int3")
    CausalLM.from_pretrained(tmp_path / "m", dtype="int8").save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    for change, message in ((dict(quant_method="gptq"), "quant_method 'gptq'"),
                            (dict(block_size=64), "block_size 32"),
                            (dict(modules={"model.layers.0.mlp.up_proj": 3}), "4 or 8"),
                            (dict(modules={"model.layers.9.mlp.up_proj": 8}), "not part of this model")):
        (tmp_path / "q" / "config.json").write_text(json.dumps(
            {**config, "quantization_config": {**config["quantization_config"], **change}}))
        with pytest.raises(FormatError, match=message):
            CausalLM.from_pretrained(tmp_path / "q")
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "q" / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.scale"] = tensors["model.layers.0.mlp.up_proj.scale"].float()
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(FormatError, match="up_proj.scale is torch.float32, not torch.float16"):
        CausalLM.from_pretrained(tmp_path / "q")
