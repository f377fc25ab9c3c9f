"""Sequence classification (issue 11): pocketlm's classifier against transformers'
AutoModelForSequenceClassification on tiny random GPT-2 and Llama models, folders moving both ways."""

import json
import logging

import pytest
import torch
import transformers

from conftest import TINY, randomize
from pocketlm import AutoModelForSequenceClassification, ConfigError, ModelConfig
from pocketlm.api import CausalLM, GPT2ForSequenceClassification, LlamaForSequenceClassification

EOS = 3  # also the pad token in these tests, as when a tokenizer has no pad token


def _batch(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of different lengths, padded with EOS on the given side."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 96, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    cut = slice(6, None) if padding == "right" else slice(None, 3)
    ids[1, cut], mask[1, cut] = EOS, 0
    return ids, mask


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.fixture(params=sorted(TINY))
def classifier(request):
    config = ModelConfig(**TINY[request.param], eos_token_id=EOS)
    return randomize(AutoModelForSequenceClassification.from_config(config, num_labels=3)).eval()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_saved_folder_gives_transformers_the_same_logits_and_back(classifier, padding, tmp_path):
    classifier.save_pretrained(tmp_path / "ours")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(theirs).__name__ == classifier.config.to_hf_config("sequence-classification")["architectures"][0]
    assert not hasattr(classifier, "lm_head") and theirs.config.pad_token_id == EOS
    ids, mask = _batch(padding)
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits
        _close(classifier(ids, attention_mask=mask).logits, expected)
        theirs.save_pretrained(tmp_path / "theirs")
        back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "theirs")
        _close(back(ids, attention_mask=mask).logits, expected)
    assert back.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_state_dict_names_are_transformers(tmp_path):
    from safetensors import safe_open

    for name, alias, prefix in (("gpt2-tied", GPT2ForSequenceClassification, "transformer."),
                                ("llama-gqa-tied", LlamaForSequenceClassification, "model.")):
        alias.from_config(ModelConfig(**TINY[name]), num_labels=2).save_pretrained(tmp_path / name)
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            names = set(f.keys())
        assert "score.weight" in names and "lm_head.weight" not in names
        assert all(n.startswith(prefix) for n in names - {"score.weight"})


@pytest.mark.parametrize("case", ["right", "left", "ends_in_eos", "all_pad_row"])
def test_pooling_matches_transformers(case, tmp_path):
    model = randomize(AutoModelForSequenceClassification.from_config(
        ModelConfig(**TINY["llama-mha-untied"], eos_token_id=EOS), num_labels=2)).eval()
    model.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, _ = _batch("left" if case == "left" else "right")
    if case == "ends_in_eos":  # a text ending in EOS when EOS is the pad: read before that EOS
        ids[0, -1] = EOS
    if case == "all_pad_row":
        ids[1] = EOS
    with torch.no_grad():
        _close(model(ids).logits, theirs(ids).logits)


def test_without_pad_token_one_row_reads_the_last_position_and_a_batch_is_refused(tmp_path):
    model = randomize(AutoModelForSequenceClassification.from_config(
        ModelConfig(**TINY["gpt2-untied"]), num_labels=2)).eval()  # no EOS either: pad stays unset
    assert model.config.pad_token_id is None
    model.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, _ = _batch("right")
    with torch.no_grad():
        _close(model(ids[1:]).logits, theirs(ids[1:]).logits)
        with pytest.raises(ValueError):
            theirs(ids)
        with pytest.raises(ConfigError, match="pad_token_id"):
            model(ids)


@pytest.mark.parametrize("num_labels,labels", [
    (3, torch.tensor([2, 0])),  # integer ids: single-label cross-entropy
    (1, torch.tensor([0.5, -1.0])),  # one label: regression
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),  # float rows: multi-label BCE
])
def test_losses_match_transformers_and_infer_the_problem_type(num_labels, labels, tmp_path):
    model = randomize(AutoModelForSequenceClassification.from_config(
        ModelConfig(**TINY["gpt2-tied"], eos_token_id=EOS), num_labels=num_labels)).eval()
    model.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = _batch("right")
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask, labels=labels).loss
        _close(model(ids, attention_mask=mask, labels=labels).loss, expected)
    assert model.config.problem_type == theirs.config.problem_type is not None


def test_config_round_trip_writes_labels_as_transformers_does(tmp_path):
    labels = {0: "negative", 1: "positive"}
    model = LlamaForSequenceClassification.from_config(
        ModelConfig(**TINY["llama-gqa-tied"], eos_token_id=EOS), id2label=labels,
        problem_type="single_label_classification")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["id2label"] == {"0": "negative", "1": "positive"}
    assert written["label2id"] == {"negative": 0, "positive": 1}
    assert written["architectures"] == ["LlamaForSequenceClassification"]
    assert (written["problem_type"], written["pad_token_id"]) == ("single_label_classification", EOS)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (theirs.id2label, theirs.label2id, theirs.num_labels) == (labels, written["label2id"], 2)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert (back.config.id2label, back.config.num_labels, back.config.problem_type) == \
        (labels, 2, "single_label_classification")
    assert ModelConfig.from_hf_config(model.config.to_hf_config()) == model.config
    with pytest.raises(ConfigError, match="num_labels"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3, id2label=labels)


def test_causal_lm_checkpoint_gets_a_fresh_score_head_with_a_warning(tmp_path, caplog):
    config = ModelConfig(**TINY["llama-mha-untied"], eos_token_id=EOS)  # untied: lm_head is on disk
    randomize(CausalLM.from_config(config)).save_pretrained(tmp_path)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="pocketlm"):
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert "score.weight newly initialised" in caplog.text
    weight = model.score.weight
    assert weight.shape == (4, 32) and abs(weight.std().item() - config.initializer_range) < 0.01
    assert model.config.pad_token_id == EOS  # EOS serves as pad when none is set
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4).eval()
    theirs.config.pad_token_id = EOS  # transformers leaves it unset: its users set it by hand
    with torch.no_grad():
        theirs.score.weight.copy_(weight)  # same head: then the backbones must agree
        ids, mask = _batch("left")
        _close(model(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits)
