"""Zero-shot classification with a causal LM (issue 11): ZeroShotClassifier's label scores against
a plain loop over the math (one full forward per text and label, log-softmax summed over the label's
tokens), on pocketlm's model and on transformers' with the same weights; the zero-shot pipelines'
output shapes; the real SmolLM2 with its chat template."""

import pytest
import torch
import transformers

from conftest import TINY, randomize
from pocketlm import AutoModelForCausalLM, AutoModelForSequenceClassification, ConfigError, ModelConfig, pipeline
from pocketlm.api import AutoTokenizer
from pocketlm.errors import ContextLengthError
from pocketlm.tokenizer import Tokenizer
from pocketlm.zeroshot import CONTENT_FREE, ZeroShotClassifier

TEXTS = ["the movie was good", "a bad film", "a great story, a poor plot. the film was bad.", "good", ""]
# one-token and several-token labels, two sharing their first token: every way rows are shared
LABELS = ["good", "bad", "a great story", "a poor plot", "movie"]
CHAT = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random causal LMs (GPT-2 and Llama) with a trained tokenizer that has a chat template."""
    root = tmp_path_factory.mktemp("zeroshot")
    (root / "text.txt").write_text("the movie was good. the film was bad. a great story, a poor plot.\n" * 50)
    tok = Tokenizer.train(root / "text.txt", 300)
    tok.chat_template = CHAT
    for arch in ("gpt2-tied", "llama-gqa-tied"):
        config = ModelConfig(**TINY[arch] | {"vocab_size": len(tok)}, eos_token_id=tok.eos_token_id)
        randomize(AutoModelForCausalLM.from_config(config)).save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
    return root


def loop_log_likelihoods(logits_of, tokenizer, prompts: list[str], continuations: list[str], special: bool):
    """The math, one (text, label) at a time: the prompt's ids, then the continuation's, through one
    full forward; the label's log-probability is the sum of log-softmax at each of its tokens."""
    rows = []
    for prompt in prompts:
        row = []
        for continuation in continuations:
            head = tokenizer.encode(prompt, add_special_tokens=special)
            tail = tokenizer.encode(continuation, add_special_tokens=False)
            logprobs = logits_of(torch.tensor([head + tail]))[0].double().log_softmax(-1)
            row.append(sum(logprobs[len(head) - 1 + k, token].item() for k, token in enumerate(tail)))
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("arch", ["gpt2-tied", "llama-gqa-tied"])
@pytest.mark.parametrize("chat", [False, True])
def test_scores_are_the_label_log_likelihoods(folders, arch, chat):
    model = AutoModelForCausalLM.from_pretrained(folders / arch).eval()
    tok = AutoTokenizer.from_pretrained(folders / arch)
    clf = ZeroShotClassifier(model, tok, LABELS, chat=chat)
    assert len({len(tok.encode(" " + label, add_special_tokens=False)) for label in LABELS}) > 1  # mixed lengths
    with torch.no_grad():
        want = loop_log_likelihoods(lambda ids: model(ids).logits, tok, [clf.prompt(t) for t in TEXTS],
                                    [clf.continuation(label) for label in LABELS], special=not chat)
    for batch_size in (1, 2, len(TEXTS)):
        got = clf.log_likelihoods(TEXTS, batch_size=batch_size)
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)
    # calibrated (the default): measured against the mean over content-free texts
    with torch.no_grad():
        free = loop_log_likelihoods(lambda ids: model(ids).logits, tok, [clf.prompt(t) for t in CONTENT_FREE],
                                    [clf.continuation(label) for label in LABELS], special=not chat).mean(0)
    torch.testing.assert_close(clf.scores(TEXTS), (want - free).softmax(-1).float(), atol=1e-5, rtol=0)
    assert clf.predict(TEXTS) == [LABELS[i] for i in (want - free).argmax(-1)]
    raw = ZeroShotClassifier(model, tok, LABELS, chat=chat, calibrate=False)
    torch.testing.assert_close(raw.scores(TEXTS), want.softmax(-1).float(), atol=1e-5, rtol=0)


def test_scores_match_transformers_model(folders):
    """The same math through transformers' GPT2LMHeadModel on the folder pocketlm saved."""
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(folders / "gpt2-tied")).eval()
    ours = AutoModelForCausalLM.from_pretrained(folders / "gpt2-tied").eval()
    tok = AutoTokenizer.from_pretrained(folders / "gpt2-tied")
    clf = ZeroShotClassifier(ours, tok, LABELS, instruction="Review: {text}\nIs it {labels}? Answer:", chat=False)
    assert clf.prompt("fine") == "Review: fine\nIs it good, bad, a great story, a poor plot, movie? Answer:"
    with torch.no_grad():
        want = loop_log_likelihoods(lambda ids: theirs(ids).logits, tok, [clf.prompt(t) for t in TEXTS],
                                    [" " + label for label in LABELS], special=True)
    torch.testing.assert_close(clf.log_likelihoods(TEXTS, batch_size=3), want.float(), atol=1e-4, rtol=0)


def test_prompt_forms(folders):
    model = AutoModelForCausalLM.from_pretrained(folders / "gpt2-tied")
    tok = AutoTokenizer.from_pretrained(folders / "gpt2-tied")
    plain, chat = (ZeroShotClassifier(model, tok, ["good", "bad"], chat=c) for c in (False, True))
    assert plain.prompt("a film") == "Classify the text as one of: good, bad.\nText: a film\nLabel:"
    assert plain.continuation("good") == " good"
    # the chat form: the question as the user's message (no "Label:" line), the label as the answer
    assert chat.prompt("a film {labels}") == \
        "<user>Classify the text as one of: good, bad.\nText: a film {labels}\n<assistant>"
    assert chat.continuation("good") == "good"
    assert not ZeroShotClassifier(model, tok, ["good", "bad"]).chat  # plain by default, even with a template
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        ZeroShotClassifier(model, tok, ["good", "bad"], chat=True)


def test_bad_input_is_a_clear_error(folders):
    model = AutoModelForCausalLM.from_pretrained(folders / "gpt2-tied")
    tok = AutoTokenizer.from_pretrained(folders / "gpt2-tied")
    for labels in ([], ["good", "good"], ["good", " "]):
        with pytest.raises(ConfigError, match="distinct, non-empty"):
            ZeroShotClassifier(model, tok, labels)
    with pytest.raises(ConfigError, match=r"\{text\}"):
        ZeroShotClassifier(model, tok, ["good", "bad"], instruction="Classify this.")
    clf = ZeroShotClassifier(model, tok, ["good", "bad"])
    with pytest.raises(ConfigError, match="list of texts"):
        clf.scores("a film")
    with pytest.raises(ConfigError, match="batch_size"):
        clf.scores(["a film"], batch_size=0)
    with pytest.raises(ContextLengthError, match="the movie was good. the movie w.*context window of 128"):
        clf.scores(["short", "the movie was good. " * 40])
    assert clf.scores([]).shape == (0, 2)
    classifier = AutoModelForSequenceClassification.from_pretrained(folders / "gpt2-tied", num_labels=2)
    with pytest.raises(ConfigError, match="no language-model head"):
        ZeroShotClassifier(classifier, tok, ["good", "bad"])


def _same(ours: dict, theirs: dict) -> None:
    assert ours["sequence"] == theirs["sequence"] and ours["labels"] == theirs["labels"]
    assert ours["scores"] == pytest.approx(theirs["scores"], abs=1e-6)


def test_zero_shot_pipeline_output(folders):
    zs = pipeline("zero-shot-classification", model=folders / "gpt2-tied")
    clf = ZeroShotClassifier(zs.model, zs.tokenizer, LABELS)
    scores = clf.scores(TEXTS)
    out = zs(TEXTS, candidate_labels=LABELS, batch_size=2)
    assert isinstance(out, list) and len(out) == len(TEXTS)
    for text, result, row in zip(TEXTS, out, scores):
        assert list(result) == ["sequence", "labels", "scores"] and result["sequence"] == text
        assert sorted(result["labels"]) == sorted(LABELS)
        assert result["scores"] == sorted(result["scores"], reverse=True)  # best first, as transformers
        assert result["scores"] == pytest.approx([row[LABELS.index(label)].item() for label in result["labels"]],
                                                 abs=1e-6)
        assert sum(result["scores"]) == pytest.approx(1.0, abs=1e-5)
    # one string gives one dict; labels as a comma-separated string or the second argument
    _same(zs(TEXTS[0], ",".join(LABELS)), out[0])
    _same(pipeline("zero-shot-classification", model=folders / "gpt2-tied", candidate_labels=LABELS)(TEXTS[0]), out[0])
    # independent labels: each one's own probability
    multi = zs(TEXTS[0], candidate_labels=LABELS, multi_label=True)
    loglik = clf.log_likelihoods(TEXTS[:1])[0]
    assert multi["scores"] == pytest.approx([loglik[LABELS.index(label)].exp().item() for label in multi["labels"]],
                                            rel=1e-5)


def test_zero_shot_pipeline_errors(folders, tmp_path):
    zs = pipeline("zero-shot-classification", model=folders / "gpt2-tied")
    with pytest.raises(ConfigError, match="candidate_labels"):
        zs("a film")
    with pytest.raises(ConfigError, match="instruction="):
        zs("a film", candidate_labels=["good", "bad"], hypothesis_template="This example is {}.")
    with pytest.raises(ConfigError, match="does not know top_k"):
        zs("a film", candidate_labels=["good", "bad"], top_k=1)
    classifier = AutoModelForSequenceClassification.from_pretrained(folders / "gpt2-tied", num_labels=2)
    classifier.save_pretrained(tmp_path / "clf", tokenizer=zs.tokenizer)
    with pytest.raises(ConfigError, match="sequence classifier"):
        pipeline("zero-shot-classification", model=tmp_path / "clf")
    with pytest.raises(ConfigError, match="drop candidate_labels"):
        pipeline("text-classification", model=tmp_path / "clf", candidate_labels=["good", "bad"])


def test_text_classification_on_a_causal_lm(folders):
    """text-classification with candidate_labels=: the zero-shot probabilities in its own output."""
    clf = pipeline("sentiment-analysis", model=folders / "llama-gqa-tied", candidate_labels=["good", "bad"])
    scores = ZeroShotClassifier(clf.model, clf.tokenizer, ["good", "bad"]).scores(TEXTS)
    best = [{"label": ["good", "bad"][int(row.argmax())], "score": pytest.approx(row.max().item(), abs=1e-6)}
            for row in scores]
    assert clf(TEXTS, batch_size=2) == best
    assert clf(TEXTS[0]) == best[:1]  # one string: a list of one, as transformers
    everything = clf(TEXTS[1], top_k=None)
    assert [r["label"] for r in everything] == ["good", "bad"][::1 if scores[1][0] >= scores[1][1] else -1]
    # one label alone: its own probability, as in the zero-shot pipeline (a softmax would give 1)
    one = pipeline("text-classification", model=folders / "llama-gqa-tied", candidate_labels=["good"])
    alone = ZeroShotClassifier(one.model, one.tokenizer, ["good"]).log_likelihoods(TEXTS[:1])[0, 0].exp().item()
    assert one(TEXTS[0]) == [{"label": "good", "score": pytest.approx(alone, rel=1e-5)}] and alone < 0.99
    assert pipeline("zero-shot-classification", model=one.model, tokenizer=one.tokenizer)(
        TEXTS[0], candidate_labels=["good"])["scores"] == [pytest.approx(alone, rel=1e-5)]
    with pytest.raises(ConfigError, match="causal LM.*candidate_labels.*zero-shot-classification"):
        pipeline("text-classification", model=folders / "llama-gqa-tied")


def test_real_smollm2_matches_the_loop(smollm2_gguf):
    """SmolLM2-135M-Instruct with its real tokenizer and ChatML template: both prompt forms equal the
    loop, and a plainly positive and a plainly negative review are labelled so (plain form)."""
    from pocketlm.api import load_model_and_tokenizer

    # float32: the scorer's batching is under test, not quantization (a quantized model takes
    # another path for few rows than for many, which would blur the comparison)
    model, tok = load_model_and_tokenizer(smollm2_gguf, dtype=torch.float32)
    texts = ["A wonderful, moving film with superb acting.", "A dull, tedious mess; I hated every minute."]
    for chat, some in ((False, texts), (True, texts[:1])):
        clf = ZeroShotClassifier(model.eval(), tok, ["positive", "negative"], chat=chat)
        with torch.no_grad():
            want = loop_log_likelihoods(lambda ids: model(ids).logits, tok, [clf.prompt(t) for t in some],
                                        [clf.continuation(label) for label in clf.labels], special=not chat)
        got = clf.log_likelihoods(some, batch_size=2)
        torch.testing.assert_close(got, want.float(), atol=2e-3, rtol=0)
        if not chat:
            assert got.argmax(-1).tolist() == [0, 1]  # positive, negative
