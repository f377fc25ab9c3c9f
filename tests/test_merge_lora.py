"""`pocketlm merge-lora BASE ADAPTER --out DIR` (issue 11): the folder it writes loads in
transformers with the logits of peft's own merge on the transformers base — for causal and
classification adapters, on folder and GGUF bases — and bad requests are refused before anything
is written."""

import json

import peft
import pytest
import torch
import transformers

from pocketlm.tokenizer import Tokenizer
from test_cli_data import one_line_error, run
from test_adapter_loading import IDS, LABELS, bases, close, make_adapter  # noqa: F401  (bases: a fixture)


def peft_merged(base_folder, adapter, classifier=False, eos=None):
    if classifier:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(base_folder, pad_token_id=eos)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    return peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


def transformers_logits(model_class, folder):
    with torch.no_grad():
        return model_class.from_pretrained(folder).eval()(IDS).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_causal_lm_loads_in_transformers_as_peft_merges_it(bases, tmp_path, capsys, family):
    adapter = make_adapter(bases, family, tmp_path / "adapter")
    code, out, _ = run(capsys, "merge-lora", bases / family, adapter, "--out", tmp_path / "merged")
    assert code == 0 and "wrote" in out
    with torch.no_grad():
        expected = peft_merged(bases / family, adapter)(IDS).logits
    close(transformers_logits(transformers.AutoModelForCausalLM, tmp_path / "merged"), expected)
    merged_tok = Tokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tok.encode("a great film") == Tokenizer.from_pretrained(bases / family).encode("a great film")

    assert run(capsys, "merge-lora", adapter, "--out", tmp_path / "again")[0] == 0  # the base it records
    close(transformers_logits(transformers.AutoModelForCausalLM, tmp_path / "again"), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_classifier_keeps_its_head_and_labels(bases, tmp_path, capsys, family):
    adapter = make_adapter(bases, family, tmp_path / "adapter", classifier=True)
    assert run(capsys, "merge-lora", bases / family, adapter, "--out", tmp_path / "merged")[0] == 0
    eos = Tokenizer.from_pretrained(bases / family).eos_token_id
    with torch.no_grad():
        expected = peft_merged(bases / family, adapter, classifier=True, eos=eos)(IDS).logits
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        close(theirs(IDS).logits, expected)
    assert theirs.config.id2label == LABELS and theirs.config.pad_token_id == eos


def test_a_gguf_base_is_merged_dequantized(bases, tmp_path, capsys):
    adapter = make_adapter(bases, "llama", tmp_path / "adapter", classifier=True)
    code, out, _ = run(capsys, "merge-lora", bases / "llama.gguf", adapter, "--out", tmp_path / "merged",
                       "--dtype", "bfloat16")
    assert code == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    eos = Tokenizer.from_pretrained(bases / "llama").eos_token_id
    with torch.no_grad():  # the GGUF file holds the llama folder's weights
        expected = peft_merged(bases / "llama", adapter, classifier=True, eos=eos)(IDS).logits
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged",
                                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # the GGUF's tokenizer


def test_bad_requests_are_refused_before_anything_is_written(bases, tmp_path, capsys):
    adapter = make_adapter(bases, "llama", tmp_path / "adapter")
    before = sorted(p.name for p in (bases / "llama").iterdir())
    err = one_line_error(capsys, "merge-lora", bases / "llama", adapter, "--out", bases / "llama" / "merged")
    assert "never writes into its base model's folder" in err
    err = one_line_error(capsys, "merge-lora", bases / "llama", adapter, "--out", bases / "llama")
    assert "never writes into its base model's folder" in err
    assert sorted(p.name for p in (bases / "llama").iterdir()) == before

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "already exists" in one_line_error(capsys, "merge-lora", adapter, "--out", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]

    err = one_line_error(capsys, "merge-lora", bases / "gpt2", adapter, "--out", tmp_path / "wrong")
    assert "does not fit its base" in err and "match no layer" in err
    err = one_line_error(capsys, "merge-lora", adapter, bases / "llama", "--out", tmp_path / "swapped")
    assert "is not a LoRA adapter folder" in err
    err = one_line_error(capsys, "merge-lora", bases / "llama", "--out", tmp_path / "plain")
    assert "is not a LoRA adapter folder" in err
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "../nowhere"}))
    err = one_line_error(capsys, "merge-lora", adapter, "--out", tmp_path / "lost")
    assert "'../nowhere'" in err and "merge-lora BASE ADAPTER" in err
    assert not any((tmp_path / name).exists() for name in ("wrong", "swapped", "plain", "lost"))


def test_a_failed_write_leaves_no_folder(bases, tmp_path, capsys, monkeypatch):
    from pocketlm.api import PretrainedModel
    from pocketlm.errors import FormatError

    adapter = make_adapter(bases, "llama", tmp_path / "adapter")

    def half_a_save(self, folder, tokenizer=None):
        (folder / "config.json").write_text("{}")
        raise FormatError("the disk is full")

    monkeypatch.setattr(PretrainedModel, "save_pretrained", half_a_save)
    assert "disk is full" in one_line_error(capsys, "merge-lora", adapter, "--out", tmp_path / "new" / "merged")
    assert not (tmp_path / "new").exists()
