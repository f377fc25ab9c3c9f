"""Fine-tune results wherever a model goes (issue 11): a fine-tune run folder loads the checkpoint
marked best, and a LoRA adapter folder loads as its base with the adapter folded in — through
from_pretrained, AutoTokenizer, load_model_and_tokenizer, pipeline() and the CLI — giving what
peft gives on the transformers model of the same base. GGUF bases load dequantized, as causal LMs
and as classifiers."""

import json
import shutil

import peft
import pytest
import torch
import transformers

from conftest import TINY, randomize
from test_gguf import llama_gguf_with_tokenizer
from pocketlm import AutoModelForSequenceClassification, ConfigError, FormatError, ModelConfig, pipeline, registry
from pocketlm.api import AutoConfig, AutoTokenizer, CausalLM, load_model_and_tokenizer
from pocketlm.cli import main
from pocketlm.errors import NotFoundError
from pocketlm.lora import LABEL_CONFIG, LoraConfig, apply_lora, lora_layers, save_adapter
from pocketlm.tokenizer import Tokenizer

IDS = torch.randint(4, 290, (2, 7), generator=torch.Generator().manual_seed(1))
TARGETS = {"llama": ("q_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "mlp.c_proj")}
LABELS = {0: "negative", 1: "positive"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random base models with a trained tokenizer: folders `llama` and `gpt2`, and `llama.gguf`
    (the llama folder's weights in float32, its tokenizer in the metadata, as llama.cpp writes them)."""
    root = tmp_path_factory.mktemp("bases")
    (root / "text.txt").write_text("the movie was good. the film was bad. a great story, a poor plot.\n" * 50)
    tok = Tokenizer.train(root / "text.txt", 300)
    for family, arch in (("llama", "llama-gqa-tied"), ("gpt2", "gpt2-untied")):
        config = ModelConfig(**TINY[arch] | {"vocab_size": len(tok)}, eos_token_id=tok.eos_token_id)
        randomize(CausalLM.from_config(config), seed=3).save_pretrained(root / family, tokenizer=tok)
    llama_gguf_with_tokenizer(root / "llama.gguf", CausalLM.from_pretrained(root / "llama"), tok)
    return root


def make_adapter(bases, family, folder, base=None, classifier=False, num_labels=2, seed=5):
    """A LoRA adapter with random (non-zero) updates on the `family` base, saved in `folder`;
    `base` is what it records (default: the base folder's absolute path)."""
    if classifier:
        model = AutoModelForSequenceClassification.from_pretrained(
            bases / family, id2label={i: LABELS.get(i, f"class {i}") for i in range(num_labels)})
    else:
        model = CausalLM.from_pretrained(bases / family)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=TARGETS[family],
                                 task_type="SEQ_CLS" if classifier else "CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
    return save_adapter(model, folder, str((bases / family).resolve()) if base is None else base)


def peft_logits(base_folder, adapter, classifier=False, eos=None):
    """What peft gives with `adapter` on the transformers model of `base_folder`."""
    if classifier:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(base_folder, pad_token_id=eos)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return theirs(IDS).logits


def close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# --- run folders ---------------------------------------------------------------------------------

def _checkpoint(run, step, source, complete=True):
    folder = run / "checkpoints" / f"step-{step:07d}"
    shutil.copytree(source, folder)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def test_a_fine_tune_run_folder_loads_its_best_checkpoint_else_the_newest(bases, tmp_path):
    run = tmp_path / "run"
    best = _checkpoint(run, 20, bases / "llama")
    newest = _checkpoint(run, 40, bases / "gpt2")
    _checkpoint(run, 60, bases / "gpt2", complete=False)  # a save cut short never counts
    assert registry.resolve(run).path == newest  # a pretraining run: no mark
    (run / "best.json").write_text(json.dumps({"checkpoint": best.name, "metric": "accuracy", "value": 0.9,
                                               "step": 20}))
    assert registry.resolve(run).path == best
    close(logits(CausalLM.from_pretrained(run)), logits(CausalLM.from_pretrained(bases / "llama")))
    shutil.rmtree(best)  # a mark whose checkpoint is gone: the newest again
    assert registry.resolve(run).path == newest
    (run / "best.json").write_text(json.dumps({"checkpoint": "../../elsewhere"}))
    with pytest.raises(FormatError, match="best.json"):
        registry.resolve(run)


def test_a_lora_run_folder_loads_its_best_adapter(bases, tmp_path):
    run = tmp_path / "run"
    for step, seed in ((10, 1), (20, 2)):
        make_adapter(bases, "llama", run / "checkpoints" / f"step-{step:07d}", seed=seed)
        (run / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").write_text("{}")
    (run / "best.json").write_text(json.dumps({"checkpoint": "step-0000010"}))
    ref = registry.resolve(run)
    assert ref.kind == "adapter" and ref.path.name == "step-0000010" and ref.base.path == bases / "llama"
    close(logits(CausalLM.from_pretrained(run)), peft_logits(bases / "llama", ref.path))


# --- adapter folders -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_causal_adapter_loads_as_its_base_with_the_adapter_merged(bases, tmp_path, family):
    adapter = make_adapter(bases, family, tmp_path / "adapter")
    expected = peft_logits(bases / family, adapter)
    model = CausalLM.from_pretrained(adapter)
    close(logits(model), expected)
    assert not lora_layers(model) and model.lora_config is None  # folded in: a plain model
    assert AutoConfig.from_pretrained(adapter).n_layer == model.config.n_layer

    model, tokenizer = load_model_and_tokenizer(adapter)  # no tokenizer in the adapter folder: the base's
    close(logits(model), expected)
    assert tokenizer.encode("a great film") == Tokenizer.from_pretrained(bases / family).encode("a great film")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(bases / family)
    theirs = peft.PeftModel.from_pretrained(theirs, adapter).merge_and_unload().eval()
    prompt = tokenizer("the movie was", return_tensors="pt")["input_ids"]
    want = theirs.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    got = pipeline("text-generation", model=adapter)("the movie was", max_new_tokens=6, do_sample=False)
    assert got[0]["generated_text"] == "the movie was" + tokenizer.decode(want[0, prompt.shape[1]:].tolist(),
                                                                          skip_special_tokens=True)


def test_an_adapter_folder_with_its_own_tokenizer_uses_it(bases, tmp_path):
    adapter = make_adapter(bases, "llama", tmp_path / "adapter")
    own = Tokenizer.from_pretrained(bases / "llama")
    own.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    own.save_pretrained(adapter)
    assert AutoTokenizer.from_pretrained(adapter).chat_template == own.chat_template
    assert load_model_and_tokenizer(adapter)[1].chat_template == own.chat_template
    assert AutoTokenizer.from_pretrained(bases / "llama").chat_template != own.chat_template


def test_the_base_is_found_beside_the_adapter_or_passed_explicitly(bases, tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))  # nothing pulled
    shutil.copytree(bases / "llama", tmp_path / "moved" / "base")
    adapter = make_adapter(bases, "llama", tmp_path / "moved" / "adapter", base="../base")
    expected = peft_logits(bases / "llama", adapter)
    close(logits(CausalLM.from_pretrained(adapter)), expected)  # relative to the adapter folder

    for recorded, names in (("../gone", ["'../gone'", "base_model="]),
                            ("smollm2-135m-instruct", ["not pulled yet", "pocketlm pull", "base_model="]),
                            (None, ["does not record its base", "base_model="])):
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": recorded}))
        with pytest.raises(NotFoundError) as e:
            CausalLM.from_pretrained(adapter)
        assert str(adapter) in str(e.value) and all(n in str(e.value) for n in names), e.value
    close(logits(CausalLM.from_pretrained(adapter, base_model=bases / "llama")), expected)
    assert AutoTokenizer.from_pretrained(adapter, base_model=bases / "llama").eos_token_id is not None
    close(logits(load_model_and_tokenizer(registry.resolve(adapter, base=bases / "llama"))[0]), expected)
    with pytest.raises(ConfigError, match="not a LoRA adapter folder"):
        CausalLM.from_pretrained(bases / "llama", base_model=bases / "gpt2")


def test_an_adapter_for_another_base_is_refused_clearly(bases, tmp_path):
    adapter = make_adapter(bases, "gpt2", tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"adapter .* does not fit its base .*llama.*c_attn.*match no layer"):
        CausalLM.from_pretrained(adapter, base_model=bases / "llama")
    adapter = make_adapter(bases, "llama", tmp_path / "other")
    config = ModelConfig(**TINY["llama-mha-untied"] | {"vocab_size": 300})  # head_dim 8, not 12
    CausalLM.from_config(config).save_pretrained(tmp_path / "small")
    with pytest.raises(FormatError, match="does not fit its base .*q_proj.lora_B.weight has shape"):
        CausalLM.from_pretrained(adapter, base_model=tmp_path / "small")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_classification_adapter_classifies_with_its_labels(bases, tmp_path, family):
    adapter = make_adapter(bases, family, tmp_path / "adapter", classifier=True)
    assert json.loads((adapter / LABEL_CONFIG).read_text()) == {
        "id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1},
        "problem_type": None}
    eos = Tokenizer.from_pretrained(bases / family).eos_token_id
    expected = peft_logits(bases / family, adapter, classifier=True, eos=eos)
    model = AutoModelForSequenceClassification.from_pretrained(adapter)
    close(logits(model), expected)
    assert model.config.id2label == LABELS and model.config.pad_token_id == eos
    assert AutoConfig.from_pretrained(adapter).id2label == LABELS

    texts = ["the movie was good", "a bad film"]
    tok = Tokenizer.from_pretrained(bases / family)
    scores = [peft_on(bases / family, adapter, eos, tok(t, return_tensors="pt")["input_ids"]) for t in texts]
    got = pipeline("sentiment-analysis", model=adapter)(texts)
    for result, probs in zip(got, scores):
        assert result["label"] == LABELS[int(probs.argmax())]
        assert result["score"] == pytest.approx(probs.max().item(), abs=1e-5)

    with pytest.raises(ConfigError, match="classification adapter.*AutoModelForSequenceClassification"):
        CausalLM.from_pretrained(adapter)


def test_pocketlm_classify_takes_a_classification_adapter(bases, tmp_path, capsys):
    adapter = make_adapter(bases, "llama", tmp_path / "adapter", classifier=True)
    expected = pipeline("text-classification", model=adapter)("a great story")[0]
    assert main(["classify", str(adapter), "a great story"]) == 0
    assert capsys.readouterr().out == f"{expected['label']}\t{expected['score']:.4f}\ta great story\n"


def peft_on(base_folder, adapter, eos, ids):
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_folder, pad_token_id=eos)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, adapter).eval()(ids).logits[0].softmax(-1)


def test_a_classification_adapter_without_label_names_gets_one_label_per_head_row(bases, tmp_path):
    adapter = make_adapter(bases, "llama", tmp_path / "adapter", classifier=True, num_labels=3)
    (adapter / LABEL_CONFIG).unlink()  # as peft saves it: no labels
    model = AutoModelForSequenceClassification.from_pretrained(adapter)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    named = AutoModelForSequenceClassification.from_pretrained(adapter, id2label={0: "a", 1: "b", 2: "c"})
    close(logits(named), logits(model))
    with pytest.raises(FormatError, match="score.weight has shape"):
        AutoModelForSequenceClassification.from_pretrained(adapter, num_labels=2)


# --- GGUF bases ----------------------------------------------------------------------------------

def test_an_adapter_on_a_gguf_base_loads_dequantized(bases, tmp_path, capsys):
    adapter = make_adapter(bases, "llama", tmp_path / "adapter", base=str(bases / "llama.gguf"))
    model, tokenizer = load_model_and_tokenizer(adapter)
    assert registry.resolve(adapter).base.kind == "gguf"
    close(logits(model), peft_logits(bases / "llama", adapter))  # the GGUF holds the llama folder's weights
    assert tokenizer.encode("a poor plot") == Tokenizer.from_pretrained(bases / "llama").encode("a poor plot")

    expected = pipeline("text-generation", model=adapter)("the film", max_new_tokens=5, do_sample=False,
                                                          return_full_text=False)
    assert main(["generate", str(adapter), "the film", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out == expected[0]["generated_text"] + "\n"
    assert main(["info", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "LoRA adapter" in out and "on down_proj q_proj v_proj (CAUSAL_LM)" in out and "llama.gguf" in out


def test_a_gguf_file_loads_as_a_classifier(bases):
    ours = AutoModelForSequenceClassification.from_pretrained(bases / "llama.gguf", num_labels=2)
    eos = Tokenizer.from_pretrained(bases / "llama").eos_token_id
    assert ours.config.pad_token_id == eos and ours.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(bases / "llama", num_labels=2,
                                                                              pad_token_id=eos).eval()
    with torch.no_grad():
        theirs.score.weight.copy_(ours.score.weight)  # the new head is random: the same on both sides
    ids = torch.cat([IDS, torch.full((2, 2), eos)], 1)  # padded rows are read before the pad
    with torch.no_grad():
        close(ours(ids).logits, theirs(ids).logits)
