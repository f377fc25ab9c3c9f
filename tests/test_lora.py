"""LoRA adapters (issue 11): module surgery checked against the math, and adapter folders moving
both ways between pocketlm and peft on the transformers model of the same tiny random Llama base."""

import copy
import json

import peft
import pytest
import torch
import transformers

from conftest import TINY, randomize
from pocketlm import AutoModelForSequenceClassification, ConfigError, FormatError, ModelConfig
from pocketlm.api import CausalLM
from pocketlm.lora import (LoraConfig, LoraLinear, apply_lora, load_adapter, lora_layers, merge_lora,
                           save_adapter)

EOS = 3
IDS = torch.randint(4, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def _model(name: str, seed: int = 0):
    return randomize(CausalLM.from_config(ModelConfig(**TINY[name])), seed).eval()


def _classifier(name: str):
    config = ModelConfig(**TINY[name], eos_token_id=EOS)
    return randomize(AutoModelForSequenceClassification.from_config(config, num_labels=3)).eval()


def _randomize_adapters(model, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def _close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


# every layer an adapter can go on, by transformers' names
ALL = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
       "gpt2": ("c_attn", "c_proj", "c_fc")}


@pytest.mark.parametrize("name", sorted(TINY))
def test_fresh_adapters_leave_logits_unchanged_and_merge_matches(name):
    model = _model(name)
    family = model.config.family
    with torch.no_grad():
        before = model(IDS).logits
        apply_lora(model, LoraConfig(r=4, alpha=8, targets=ALL[family]))
        assert len(lora_layers(model)) == {"llama": 7, "gpt2": 4}[family] * model.config.n_layer
        _close(model(IDS).logits, before)
        _randomize_adapters(model)
        adapted = model(IDS).logits
        assert (adapted - before).abs().max() > 1e-3  # the adapters now matter
        merge_lora(model)
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        _close(model(IDS).logits, adapted)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # plain names again


@pytest.mark.parametrize("targets", [("o_proj",), ("q_proj", "down_proj")])
def test_generate_runs_the_adapters_even_after_fast_decoding_packed_the_model(targets):
    model = _model("llama-gqa-tied")
    prompt = IDS[:1, :3]
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False)  # packs q/k/v for fast decoding
    apply_lora(model, LoraConfig(r=2, targets=targets))
    _randomize_adapters(model)
    merged = merge_lora(copy.deepcopy(model))
    expected = merged.generate(prompt, max_new_tokens=6, do_sample=False)
    assert not torch.equal(expected, plain)  # the adapters change the continuation
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_update_is_b_times_a_scaled_with_dropout_only_on_the_adapter_input():
    base = torch.nn.Linear(6, 5)
    layer = LoraLinear(base, r=2, scaling=3.0, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    layer.eval()
    _close(layer(x), base(x) + 3.0 * x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    layer.train()
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(x, 0.5)
    _close(out, base(x) + 3.0 * dropped @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())


def test_only_adapters_train():
    model = _model("llama-gqa-tied")
    apply_lora(model, LoraConfig(r=2, targets=("q_proj", "down_proj")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{path}.lora_{ab}.weight" for i in range(2)
                         for path in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_classifier_trains_adapters_and_the_score_head():
    model = apply_lora(_classifier("llama-gqa-tied"), LoraConfig(r=2, targets=("v_proj",), task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"score.weight"} | {f"model.layers.{i}.self_attn.v_proj.lora_{ab}.weight"
                                             for i in range(2) for ab in "AB"}


def test_bad_targets_and_models_are_refused():
    with pytest.raises(ConfigError, match="match no layer.*gate_proj.*q_proj"):
        apply_lora(_model("llama-gqa-tied"), LoraConfig(targets=("c_attn",)))
    with pytest.raises(ConfigError, match="q_proj match no layer.*c_attn c_fc c_proj"):
        apply_lora(_model("gpt2-tied"), LoraConfig(targets=("q_proj",)))
    with pytest.raises(ConfigError, match="score"):
        apply_lora(_model("llama-gqa-tied"), LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="already"):
        apply_lora(apply_lora(_model("llama-gqa-tied"), LoraConfig()), LoraConfig())


PARTIAL = {"llama": ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"), "gpt2": ("c_attn", "mlp.c_proj")}


@pytest.mark.parametrize("name", sorted(TINY))
def test_pocketlm_adapter_loads_in_peft_and_peft_adapter_loads_in_pocketlm(name, tmp_path):
    ours = _model(name)
    ours.save_pretrained(tmp_path / "base")
    apply_lora(ours, LoraConfig(r=4, alpha=12, targets=PARTIAL[ours.config.family]))
    _randomize_adapters(ours)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(tmp_path / "base"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["base_model_name_or_path"] == str(tmp_path / "base")

    _moves_both_ways(ours, tmp_path, transformers.AutoModelForCausalLM, CausalLM)


def _moves_both_ways(ours, tmp_path, theirs_class, ours_class):
    """The adapter in tmp_path/ours (on the base in tmp_path/base) gives peft ours's logits, and
    peft's own save, with its own key names, loads onto a fresh pocketlm base with them too."""
    base = theirs_class.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        expected = theirs(IDS).logits
        _close(ours(IDS).logits, expected)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(ours_class.from_pretrained(tmp_path / "base").eval(), tmp_path / "theirs")
    with torch.no_grad():
        _close(back(IDS).logits, expected)


@pytest.mark.parametrize("name", ["llama-mha-untied", "gpt2-untied"])
def test_peft_trained_adapter_with_its_own_init_loads_in_pocketlm(name, tmp_path):
    _model(name).save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(CausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter")
    with torch.no_grad():
        _close(ours(IDS).logits, theirs(IDS).logits)


@pytest.mark.parametrize("name, targets", [("llama-gqa-tied", ("q_proj", "v_proj")), ("gpt2-tied", ("c_attn",))])
def test_seq_cls_adapter_with_score_head_moves_both_ways(name, targets, tmp_path):
    ours = _classifier(name)
    ours.save_pretrained(tmp_path / "base")
    apply_lora(ours, LoraConfig(r=2, targets=targets, task_type="SEQ_CLS"))
    _randomize_adapters(ours)
    with torch.no_grad():
        ours.score.weight.mul_(-2.0)  # a trained head differs from the base folder's
    save_adapter(ours, tmp_path / "ours", str(tmp_path / "base"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]

    _moves_both_ways(ours, tmp_path, transformers.AutoModelForSequenceClassification,
                     AutoModelForSequenceClassification)


def test_an_adapter_for_another_base_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    small = apply_lora(_model("llama-gqa-tied"), LoraConfig(r=2, targets=("q_proj",)))
    save_adapter(small, tmp_path / "adapter")
    other = _model("llama-mha-untied")  # head_dim 8, not 12: q_proj has other shapes
    with torch.no_grad():
        before = other(IDS).logits
    with pytest.raises(FormatError, match="q_proj.lora_B.weight has shape"):
        load_adapter(other, tmp_path / "adapter")
    assert not lora_layers(other) and all(p.requires_grad for p in other.parameters())
    with torch.no_grad():
        torch.testing.assert_close(other(IDS).logits, before, rtol=0, atol=0)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora"):
        load_adapter(other, tmp_path / "adapter")
