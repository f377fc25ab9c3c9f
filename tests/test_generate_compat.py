"""generate() as transformers 5.24 runs it, side by side on tiny random GPT-2 and Llama models
loaded with the same weights: default lengths, `model.generation_config` as an object,
`generation_config=`, return_dict_in_generate with scores/logits and compute_transition_scores,
min_new_tokens / no_repeat_ngram_size / bad_words_ids / suppress_tokens, beam search, and the
up-front memory bound on return sequences and beams."""

import copy
import json
import warnings

import pytest
import torch
import transformers

from conftest import TINY, randomize
from pocketlm import generate as generate_module
from pocketlm.api import CausalLM
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.generate import GenerationConfig, Generator

VOCAB = 48
IDS = torch.tensor([[0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26]])  # two prompts, the first left-padded
MASK = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])


@pytest.fixture(scope="module", params=["gpt2-untied", "llama-gqa-tied"])
def pair(request, tmp_path_factory):
    """(ours, transformers', eos) with the same random weights, neither with EOS or pad ids set;
    eos is the id greedy decoding picks second for IDS[0], so that as EOS it ends that row early."""
    config = ModelConfig(**{**TINY[request.param], "vocab_size": VOCAB})
    ours = randomize(CausalLM.from_config(config), seed=3).eval()
    folder = tmp_path_factory.mktemp(request.param)
    ours.save_pretrained(folder)
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return ours, theirs, ours.generate(IDS, attention_mask=MASK, do_sample=False, max_new_tokens=2)[0, 7].item()


def both(pair, ids=IDS, seed=0, **settings):
    """The same generate call on both models, each from the same torch RNG state."""
    ours, theirs, _ = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns about its own defaults
        torch.manual_seed(seed)
        a = ours.generate(ids, **settings)
        torch.manual_seed(seed)
        b = theirs.generate(ids, **settings)
    return a, b


def assert_same_steps(a, b, atol=1e-4):
    assert len(a) == len(b)
    for ours, theirs in zip(a, b):
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=atol)


# --- lengths ------------------------------------------------------------------------------------

def test_default_is_twenty_new_tokens_and_max_length_is_a_total(pair):
    ours, theirs, eos = pair
    prompt = torch.arange(1, 31)[None]  # 30 tokens: more than 20, so "20 in total" would fail
    plain = dict(attention_mask=torch.ones_like(prompt), do_sample=False)
    for settings, new in [({}, 20), (dict(max_length=40), 10), (dict(max_new_tokens=5, max_length=40), 5)]:
        a, b = both(pair, prompt, **plain, **settings)
        assert a.shape[1] - 30 == b.shape[1] - 30 == new, settings
        assert torch.equal(a, b)
    long = torch.arange(1, 121)[None] % VOCAB  # the window is 128: the default stops at its end
    a, b = both(pair, long, attention_mask=torch.ones_like(long), do_sample=False)
    assert a.shape[1] == b.shape[1] == 128 and torch.equal(a, b)
    with pytest.raises(ValueError):
        both(pair, prompt, **plain, max_length=25)
    with pytest.raises(ContextLengthError, match="max_length=25 .*set max_new_tokens"):
        ours.generate(prompt, **plain, max_length=25)


@pytest.mark.parametrize("stored, new", [(dict(max_length=40), 10), (dict(max_new_tokens=7), 7)])
def test_generation_config_lengths_are_read_as_transformers_reads_them(pair, stored, new):
    ours, theirs, eos = pair
    prompt = torch.arange(1, 31)[None]
    for model in pair[:2]:
        for key, value in stored.items():
            setattr(model.generation_config, key, value)
    try:
        a, b = both(pair, prompt, attention_mask=torch.ones_like(prompt), do_sample=False)
        assert a.shape[1] - 30 == b.shape[1] - 30 == new and torch.equal(a, b)
    finally:
        for model in pair[:2]:
            for key in stored:
                setattr(model.generation_config, key, None)


# --- model.generation_config and generation_config= ----------------------------------------------

def test_generation_config_is_an_object_generate_uses_and_saves(pair, tmp_path):
    ours, theirs, eos = pair
    before = copy.deepcopy(ours.generation_config)
    try:
        ours.generation_config.pad_token_id = 7
        ours.generation_config.eos_token_id = eos
        ours.generation_config.max_new_tokens = 6
        ours.generation_config.do_sample = False
        a, b = both(pair, attention_mask=MASK, pad_token_id=7, eos_token_id=eos, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours.generate(IDS, attention_mask=MASK), b)
        assert (a[0, 8:] == 7).all()  # row 0 ended at EOS and was padded with the pad id set above
        ours.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "generation_config.json").read_text())
        assert {k: saved[k] for k in ("pad_token_id", "eos_token_id", "max_new_tokens", "do_sample")} == \
            {"pad_token_id": 7, "eos_token_id": eos, "max_new_tokens": 6, "do_sample": False}
        read_by_transformers = transformers.GenerationConfig.from_pretrained(tmp_path)
        assert (read_by_transformers.pad_token_id, read_by_transformers.max_new_tokens) == (7, 6)
        loaded = CausalLM.from_pretrained(tmp_path)
        assert isinstance(loaded.generation_config, GenerationConfig)
        assert loaded.generation_config.explicit() == ours.generation_config.explicit()
    finally:
        ours.generation_config = before


def test_generation_config_argument_ours_or_transformers(pair):
    ours, theirs, eos = pair
    reference = theirs.generate(IDS, attention_mask=MASK, generation_config=transformers.GenerationConfig(
        max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=7))
    for config in (GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=7),
                   transformers.GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=7),
                   {"max_new_tokens": 5, "do_sample": False, "eos_token_id": eos, "pad_token_id": 7}):
        assert torch.equal(ours.generate(IDS, attention_mask=MASK, generation_config=config), reference)
    # the call's own keywords win over the object's settings, as in transformers
    assert ours.generate(IDS, attention_mask=MASK, generation_config=GenerationConfig(max_new_tokens=5),
                         max_new_tokens=2).shape[1] == 8
    with pytest.raises(ConfigError, match="does not support the generation settings \\['typical_p'\\]"):
        ours.generate(IDS, generation_config=transformers.GenerationConfig(typical_p=0.5, do_sample=True))


# --- return_dict_in_generate, scores, logits, transition scores ----------------------------------

@pytest.mark.parametrize("settings", [
    dict(do_sample=False),
    dict(do_sample=True, temperature=0.8, top_k=10),
    dict(do_sample=True, top_p=0.9, min_p=0.05, num_return_sequences=3),
], ids=["greedy", "temperature-top-k", "top-p-min-p-3-sequences"])
def test_scores_logits_and_transition_scores_match(pair, settings):
    ours, theirs, eos = pair
    a, b = both(pair, seed=5, attention_mask=MASK, max_new_tokens=10, pad_token_id=7, eos_token_id=eos,
                return_dict_in_generate=True, output_scores=True, output_logits=True, **settings)
    assert torch.equal(a.sequences, b.sequences) and a["sequences"] is a.sequences
    assert_same_steps(a.scores, b.scores)  # processed (and, sampling, warped), finished rows included
    assert_same_steps(a.logits, b.logits)  # raw
    for normalize in (False, True):
        assert torch.allclose(ours.compute_transition_scores(a.sequences, a.scores, normalize_logits=normalize),
                              theirs.compute_transition_scores(b.sequences, b.scores, normalize_logits=normalize),
                              atol=1e-4)
    plain = ours.generate(IDS, attention_mask=MASK, max_new_tokens=10, eos_token_id=eos, output_scores=True,
                          **settings)
    assert isinstance(plain, torch.Tensor)  # without return_dict_in_generate: the ids alone


# --- processors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["min_new_tokens", "min_length", "bad_words_and_suppress", "no_repeat_2", "mixed"])
def test_logits_processors_match(pair, name):
    ids = torch.tensor([[5, 6, 5, 6, 11, 12], [21, 22, 23, 24, 25, 26]])
    free = pair[0].generate(ids, do_sample=False, max_new_tokens=3)[:, 6:].tolist()
    eos = free[0][1] if name.startswith("min") else None  # row 0's second token, to be held back
    settings = {"min_new_tokens": dict(min_new_tokens=5), "min_length": dict(min_length=10),  # 6 + 4 new
                # ban row 1's second token after its first, and its third outright
                "bad_words_and_suppress": dict(bad_words_ids=[free[1][:2], [1, 2, 3]], suppress_tokens=[free[1][2]]),
                "no_repeat_2": dict(no_repeat_ngram_size=2),
                "mixed": dict(no_repeat_ngram_size=1, min_new_tokens=3, repetition_penalty=1.3)}[name]
    free, _ = both(pair, ids, do_sample=False, max_new_tokens=14, eos_token_id=eos, pad_token_id=7)
    a, b = both(pair, ids, do_sample=False, max_new_tokens=14, eos_token_id=eos, pad_token_id=7,
                return_dict_in_generate=True, output_scores=True, **settings)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, free)  # the setting changed the tokens
    assert_same_steps(a.scores, b.scores)


# --- beam search ---------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, ending", [
    (dict(num_beams=3), None),
    (dict(num_beams=4, num_return_sequences=2, length_penalty=0.5), "one"),
    (dict(num_beams=3, early_stopping=True), "two"),
    (dict(num_beams=3, early_stopping="never", length_penalty=2.0), "one"),
], ids=["3-no-EOS", "4-return-2-lp0.5", "early-true-two-EOS", "early-never-lp2"])
def test_beam_search_matches_transformers(pair, settings, ending):
    ours, theirs, eos = pair
    eos = {None: None, "one": eos, "two": [eos, ours.generate(IDS, attention_mask=MASK, max_new_tokens=1)[1, 6].item()]}
    a, b = both(pair, attention_mask=MASK, do_sample=False, max_new_tokens=12, eos_token_id=eos[ending], pad_token_id=9,
                return_dict_in_generate=True, output_scores=True, output_logits=True, **settings)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.sequences_scores, b.sequences_scores, atol=1e-4)
    assert torch.equal(a.beam_indices, b.beam_indices.long())
    assert_same_steps(a.scores, b.scores)
    assert_same_steps(a.logits, b.logits)
    assert torch.allclose(ours.compute_transition_scores(a.sequences, a.scores, a.beam_indices),
                          theirs.compute_transition_scores(b.sequences, b.scores, b.beam_indices), atol=1e-4)
    if settings.get("early_stopping") != "never":  # (which favours long beams here)
        ended = torch.isin(a.sequences[:, 6:], torch.tensor(eos[ending] or [])).any(-1)
        assert ended.any() == (ending is not None)  # with an EOS some returned beams end early


class _IdsTokenizer:
    """Enough of a tokenizer for the text API on a model without one: ids as space-separated text."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_beam_search_through_the_text_api(pair):
    ours, _, eos = pair
    # several return sequences with beams do not imply sampling
    ids = ours.generate(IDS[1:], max_new_tokens=8, num_beams=3, num_return_sequences=2, eos_token_id=eos,
                        pad_token_id=9)
    completions = Generator(ours, tokenizer=_IdsTokenizer()).generate(
        IDS[1].tolist(), max_new_tokens=8, num_beams=3, num_return_sequences=2, eos_token_id=eos, pad_token_id=9)
    for row, completion in zip(ids, completions):
        new = row[6:].tolist()
        ended = eos in new
        assert completion.token_ids == (new[:new.index(eos)] if ended else new)
        assert completion.finish_reason == ("stop" if ended else "length")


@pytest.mark.parametrize("settings, match", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 is more than num_beams=2"),
    (dict(num_beams=2, do_sample=True), "pass do_sample=False for beam search"),
    (dict(num_beams=2, temperature=0.7), "pass do_sample=False for beam search"),
    (dict(num_beams=0), "num_beams must be an integer ≥ 1"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(bad_words_ids=[[]]), "bad_words_ids must be a list of non-empty lists"),
    (dict(suppress_tokens=[VOCAB]), "beyond the model's vocabulary"),
    (dict(num_beams=2, streamer=print), "streamer cannot follow beam search"),
])
def test_beam_and_processor_settings_are_checked(pair, settings, match):
    with pytest.raises(ConfigError, match=match):
        pair[0].generate(IDS, attention_mask=MASK, max_new_tokens=4, **settings)


# --- bounded up front ----------------------------------------------------------------------------

def test_return_sequences_and_beams_are_bounded_by_memory(pair, monkeypatch):
    ours, _, _ = pair
    c = ours.config
    # 2 prompts × 3 return sequences, a cache of 64 positions (6 + 4 rounded up), float32 numbers
    need = 2 * 3 * (c.n_layer * 2 * c.n_kv_head * c.head_dim * 64 * 4 + 3 * c.vocab_size * 4)
    monkeypatch.setattr(generate_module, "available_memory", lambda device: 2 * need)
    ours.generate(IDS, attention_mask=MASK, max_new_tokens=4, num_return_sequences=3, do_sample=True)
    monkeypatch.setattr(generate_module, "available_memory", lambda device: 2 * need - 2)
    with pytest.raises(ConfigError, match="2 prompt\\(s\\) × 3 \\(num_return_sequences\\) = 6 sequences.*"
                                          "fewer sequences"):
        ours.generate(IDS, attention_mask=MASK, max_new_tokens=4, num_return_sequences=3, do_sample=True)
    with pytest.raises(ConfigError, match="× 3 \\(num_beams\\)"):
        ours.generate(IDS, attention_mask=MASK, max_new_tokens=4, num_beams=3, do_sample=False)


def test_huge_num_return_sequences_is_refused_before_any_allocation(pair):
    ours, _, _ = pair
    with pytest.raises(ConfigError, match="more than half of the"):
        Generator(ours, _IdsTokenizer()).generate([1, 2, 3], max_new_tokens=4, num_return_sequences=10**12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny GPT-2 checkpoint with a trained tokenizer, loadable by transformers too."""
    from pocketlm.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("with-tokenizer")
    (path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    tokenizer = Tokenizer.train([path / "t.txt"], vocab_size=280)
    config = ModelConfig(**{**TINY["gpt2-untied"], "vocab_size": len(tokenizer)})
    randomize(CausalLM.from_config(config), seed=2).save_pretrained(path / "m", tokenizer=tokenizer)
    return path / "m"


def test_stop_strings_end_rows_as_in_transformers(folder):
    from pocketlm.tokenizer import Tokenizer

    ours, tokenizer = CausalLM.from_pretrained(folder).eval(), Tokenizer.from_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer.encode("the quick")])
    new = ours.generate(ids, do_sample=False, max_new_tokens=20)[0, ids.shape[1]:].tolist()
    # a token of the free-running text that decodes to plain text (random weights emit raw bytes)
    at, stop = next((i, text) for i, t in enumerate(new) if (text := tokenizer.decode([t])).strip()
                    and text.isascii() and text.isprintable())
    a = ours.generate(ids, do_sample=False, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer)
    b = theirs.generate(ids, do_sample=False, max_new_tokens=20, stop_strings=[stop],
                        tokenizer=transformers.AutoTokenizer.from_pretrained(folder), pad_token_id=0)
    assert torch.equal(a, b) and a.shape[1] <= ids.shape[1] + at + 1
    with pytest.raises(ConfigError, match="tokenizer"):
        ours.generate(ids, max_new_tokens=4, stop_strings=[stop])


def test_cli_num_return_sequences_too_many_is_a_one_line_error(folder, capsys):
    from test_cli_generate import one_line_error

    err = one_line_error(capsys, "generate", folder, "the quick", "--num-return-sequences", 10**9,
                         "--max-new-tokens", 4)
    assert "--num-return-sequences" in err


def test_text_streamer_never_prints_half_a_character_and_prints_the_whole_text(folder, capsys):
    from pocketlm import TextStreamer
    from pocketlm.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(folder)
    text = "café 🙂 naïve"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters span several byte tokens
    streamer = TextStreamer(tok, skip_prompt=True)
    streamer.put(torch.tensor([[1, 2]]))  # the prompt, skipped
    for token in ids:
        streamer.put(torch.tensor([token]))
        assert "\ufffd" not in capsys.readouterr().out.replace("\n", "")
    streamer.end()
    out = capsys.readouterr().out
    assert "\ufffd" not in out
    streamer = TextStreamer(tok)  # the same ids, printed one at a time, join to the text
    parts = []
    streamer.on_finalized_text = lambda t, stream_end=False: parts.append(t)
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(parts) == tok.decode(ids) == text
