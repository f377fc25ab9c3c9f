"""Checkpoint folders: round trips with transformers both ways, sharded weights, and every kind
of bad file giving a typed error while existing checkpoints stay intact."""

import json
import struct

import pytest
import torch
import transformers
from safetensors.torch import save_file

from conftest import TINY, randomize
from pocketlm import checkpoint
from pocketlm.checkpoint import load_pretrained, save_pretrained
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, FormatError, NotFoundError, UnsafeFormatError
from pocketlm.model import Transformer

HF_CONFIGS = {
    "gpt2": lambda tied: transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2,
                                                 n_head=4, tie_word_embeddings=tied),
    "llama": lambda tied: transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=12,
                                                   max_position_embeddings=64, tie_word_embeddings=tied),
}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_folder_saved_by_transformers_loads_with_same_logits(family, tied, tmp_path):
    torch.manual_seed(0)
    hf = randomize(transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family](tied))).eval()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.family == family and model.config.tie_embeddings == tied
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_gpt2_names_without_transformer_prefix_and_mask_buffers_load(tmp_path):
    """The original GPT-2 files name tensors `h.0.attn.c_attn.weight` and carry `attn.bias` buffers."""
    torch.manual_seed(1)
    hf = randomize(transformers.AutoModelForCausalLM.from_config(HF_CONFIGS["gpt2"](True))).eval()
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
               if k != "lm_head.weight"}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    model = load_pretrained(tmp_path)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_sharded_save_loads_in_transformers_and_back(tmp_path):
    config = ModelConfig(**TINY["llama-gqa-tied"])
    model = randomize(Transformer(config)).eval()
    save_pretrained(model, tmp_path, max_shard_size=8_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(0, 96, (1, 8))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = load_pretrained(tmp_path)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-4
        assert torch.equal(again(ids).logits, model(ids).logits)
    save_pretrained(model, tmp_path)  # re-saving unsharded removes the stale shards
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    assert torch.equal(load_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_pocketlm_only_config_round_trips(tmp_path):
    config = ModelConfig(**{**TINY["gpt2-tied"], "pos": "sinusoidal"})
    model = randomize(Transformer(config)).eval()
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "pocketlm"
    again = load_pretrained(tmp_path)
    assert again.config == config
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_dtype_choice_and_auto(tmp_path):
    model = Transformer(ModelConfig(**TINY["llama-mha-untied"])).to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    assert load_pretrained(tmp_path).dtype == torch.float32  # as transformers: fp32 unless asked
    assert load_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert load_pretrained(tmp_path, dtype="fp16").dtype == torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_pretrained(tmp_path, dtype="float12")


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = randomize(Transformer(ModelConfig(**TINY["llama-gqa-tied"]))).eval()
    save_pretrained(model, tmp_path)
    return tmp_path


def test_missing_folder_and_hub_names(tmp_path):
    with pytest.raises(NotFoundError, match="model hub"):
        load_pretrained("gpt2")
    with pytest.raises(NotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig(**TINY["gpt2-tied"]).to_hf_config()))
    with pytest.raises(NotFoundError, match="no weights"):
        load_pretrained(tmp_path)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="outside|truncated"):
        load_pretrained(saved)
    path.write_bytes(data[:5])
    with pytest.raises(FormatError, match="too short"):
        load_pretrained(saved)


def test_header_that_lies_about_its_size(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(FormatError, match="header claims"):
        load_pretrained(saved)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_header_with_bad_dtype_or_inconsistent_byte_count(saved):
    path = saved / "model.safetensors"
    _rewrite_header(path, lambda h: h["model.norm.weight"].update(dtype="F7"))
    with pytest.raises(FormatError, match="unsupported dtype"):
        load_pretrained(saved)
    _rewrite_header(path, lambda h: h["model.norm.weight"].update(dtype="F32", shape=[33]))
    with pytest.raises(FormatError, match="needs .* bytes"):
        load_pretrained(saved)


def test_wrong_shapes_unknown_and_missing_tensors(saved):
    tensors = checkpoint.read_safetensors(saved / "model.safetensors")
    save_file({**tensors, "model.norm.weight": torch.ones(31)}, saved / "model.safetensors")
    with pytest.raises(FormatError, match=r"model.norm.weight has shape \(31,\)"):
        load_pretrained(saved)
    save_file({**tensors, "model.layers.0.mlp.extra.weight": torch.ones(3)}, saved / "model.safetensors")
    with pytest.raises(FormatError, match="not in a llama model"):
        load_pretrained(saved)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(FormatError, match="lack 1 tensors.*up_proj"):
        load_pretrained(saved)


def test_config_inconsistent_with_weights_or_itself(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(FormatError, match="shape"):
        load_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        load_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**config, "num_hidden_layers": -2}))
    with pytest.raises(ConfigError, match="n_layer"):
        load_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_pretrained(saved)


def test_unknown_architecture(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConfigError, match="unknown architecture model_type='bert'"):
        load_pretrained(saved)


def test_pickle_needs_explicit_opt_in(saved):
    tensors = checkpoint.read_safetensors(saved / "model.safetensors")
    torch.save(tensors, saved / "pytorch_model.bin")
    (saved / "model.safetensors").unlink()
    with pytest.raises(UnsafeFormatError, match="allow_pickle=True"):
        load_pretrained(saved)
    model = load_pretrained(saved, allow_pickle=True)
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


def test_failed_save_leaves_previous_checkpoint_intact(saved, monkeypatch):
    before = (saved / "model.safetensors").read_bytes()
    model = randomize(Transformer(ModelConfig(**TINY["llama-gqa-tied"])), seed=9)

    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert not list(saved.glob(".*tmp"))
    load_pretrained(saved)


@pytest.mark.parametrize("field, value", [("rope_parameters", {"rope_theta": "fast"}), ("rms_norm_eps", "tiny"), ("hidden_size", "wide"),
                                          ("num_hidden_layers", 2.5), ("vocab_size", None)])
def test_config_fields_of_the_wrong_type(saved, field, value):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ConfigError):
        load_pretrained(saved)
