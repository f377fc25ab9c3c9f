"""pipeline() (issue 11): pocketlm's text-classification and text-generation pipelines side by side
with transformers' pipeline on the same tiny folders saved by pocketlm."""

import pytest
import transformers

from conftest import TINY, randomize
from pocketlm import AutoModelForCausalLM, AutoModelForSequenceClassification, ConfigError, ModelConfig, pipeline
from pocketlm.api import AutoTokenizer
from pocketlm.tokenizer import Tokenizer

TEXTS = ["the movie was good", "a bad film", "a great story, a poor plot. the film was bad.", "good"]
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama sentiment classifier and a tiny GPT-2 causal LM, each with a trained tokenizer."""
    root = tmp_path_factory.mktemp("pipelines")
    (root / "text.txt").write_text("the movie was good. the film was bad. a great story, a poor plot.\n" * 50)
    tok = Tokenizer.train(root / "text.txt", 300)
    tok.chat_template = CHAT
    for name, arch, build in (("clf", "llama-mha-untied", lambda c: AutoModelForSequenceClassification.from_config(
            c, id2label={0: "negative", 1: "positive"})), ("gen", "gpt2-tied", AutoModelForCausalLM.from_config)):
        # the classifier pads with the tokenizer's pad token, so transformers' padded batches agree
        config = ModelConfig(**TINY[arch] | {"vocab_size": len(tok)}, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id if name == "clf" else None)
        randomize(build(config)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _same_labels(ours, theirs):
    if isinstance(theirs, dict):
        assert ours["label"] == theirs["label"] and ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
        return
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        _same_labels(a, b)


@pytest.mark.parametrize("task", ["sentiment-analysis", "text-classification"])
def test_classification_matches_transformers(folders, task):
    ours, theirs = pipeline(task, model=folders / "clf"), transformers.pipeline(task, model=str(folders / "clf"))
    for call in (dict(), dict(top_k=None), dict(top_k=1), dict(batch_size=3), dict(batch_size=3, top_k=None)):
        _same_labels(ours(TEXTS, **call), theirs(TEXTS, **call))
        _same_labels(ours(TEXTS[0], **call), theirs(TEXTS[0], **call))  # the shape for one string too
    assert {r["label"] for r in ours(TEXTS)} <= {"negative", "positive"}


def test_batch_size_never_changes_a_score(folders, tmp_path):
    """A classifier whose pad (EOS, as pocketlm sets when the base has none) differs from the
    tokenizer's: pocketlm pads with the classifier's pad, so batches score as single texts."""
    model = AutoModelForSequenceClassification.from_pretrained(folders / "clf")
    model.config.pad_token_id = model.config.eos_token_ids[0]
    clf = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(folders / "clf"))
    _same_labels(clf(TEXTS, top_k=None, batch_size=4), clf(TEXTS, top_k=None))


def test_generation_matches_transformers(folders):
    ours = pipeline("text-generation", model=folders / "gen")
    theirs = transformers.pipeline("text-generation", model=str(folders / "gen"))
    for call in (dict(), dict(return_full_text=False)):
        call = dict(call, max_new_tokens=6, do_sample=False)
        assert ours("the movie", **call) == theirs("the movie", **call)
        assert ours(["the movie", "a bad"], **call) == theirs(["the movie", "a bad"], **call)
    chat = [{"role": "user", "content": "the film was"}]
    assert ours(chat, max_new_tokens=4, do_sample=False) == theirs(chat, max_new_tokens=4, do_sample=False)


def test_model_object_needs_its_tokenizer(folders):
    model = AutoModelForCausalLM.from_pretrained(folders / "gen")
    with pytest.raises(ConfigError, match="tokenizer="):
        pipeline("text-generation", model=model)
    gen = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(folders / "gen"))
    assert gen("the", max_new_tokens=3, do_sample=False) == \
        pipeline("text-generation", model=folders / "gen")("the", max_new_tokens=3, do_sample=False)


def test_wrong_task_or_model_kind_is_a_clear_error(folders):
    with pytest.raises(ConfigError, match="text-classification.*text-generation"):
        pipeline("summarise", model=folders / "gen")
    with pytest.raises(ConfigError, match="causal LM.*zero-shot"):
        pipeline("sentiment-analysis", model=folders / "gen")
    with pytest.raises(ConfigError, match="text-classification"):
        pipeline("text-generation", model=folders / "clf")


def test_api_exports_pipeline():
    from pocketlm.api import pipeline as from_api

    assert from_api is pipeline


@pytest.mark.parametrize("labels", [dict(num_labels=1), dict(num_labels=3, problem_type="multi_label_classification"),
                                    dict(num_labels=1, problem_type="regression")])
def test_sigmoid_and_regression_heads_match_transformers(folders, labels, tmp_path):
    tok = AutoTokenizer.from_pretrained(folders / "clf")
    config = ModelConfig(**TINY["gpt2-tied"] | {"vocab_size": len(tok)}, pad_token_id=tok.pad_token_id)
    randomize(AutoModelForSequenceClassification.from_config(config, **labels)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ours, theirs = pipeline("text-classification", model=tmp_path), transformers.pipeline("text-classification",
                                                                                            model=str(tmp_path))
    _same_labels(ours(TEXTS, top_k=None), theirs(TEXTS, top_k=None))
