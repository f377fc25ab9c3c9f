"""The generation engine: greedy parity with transformers and with a cache-free loop, batching,
the samplers on hand-made logits, streaming text deltas, stop rules, logprobs and validation."""

import math
import shutil

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY, randomize
from pocketlm.api import CausalLM
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.generate import (Completion, GenerationConfig, Generator, TextTracker, apply_repetition_penalty,
                               filter_logits)
from pocketlm.tokenizer import Tokenizer

CORPUS = ("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 🦊🐶 "
          "Émile's café serves crème brûlée; naïve coöperation. <b>stop here</b> END\n") * 60


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(CORPUS)
    return Tokenizer.train([path], vocab_size=400)


@pytest.fixture(scope="module")
def llama(tokenizer):
    config = ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    return randomize(CausalLM.from_config(config)).eval()


def greedy_without_cache(model, ids, n):
    """The reference: recompute the whole sequence every step, no cache at all."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


# --- greedy parity --------------------------------------------------------------------------

def test_greedy_equals_transformers_and_cache_free_loop(tiny_config, tmp_path):
    torch.manual_seed(1)
    model = randomize(CausalLM.from_config(tiny_config)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 6))
    ours = Generator(model).generate_ids(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                         pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, greedy_without_cache(model, prompt, 24))


def test_batched_prompts_of_different_lengths_match_each_alone(llama, tokenizer):
    gen = Generator(llama, tokenizer)
    prompts = ["The quick", "Émile's café serves crème", "敏捷的", "🦊"]
    alone = [gen.generate(p, max_new_tokens=12, do_sample=False, eos_token_id=None) for p in prompts]
    together = gen.generate(prompts, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in together)


def test_a_long_prompt_prefilled_in_chunks_continues_as_one_call(llama, monkeypatch):
    """Prompts longer than PREFILL_CHUNK go in pieces (bounded memory); the cache and the next
    tokens are what one forward over the whole prompt gives, padded rows included."""
    import pocketlm.generate as generate_module

    ids = torch.randint(1, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0  # the second prompt is 5 tokens, left-padded

    def run():
        with torch.no_grad():
            return llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, return_dict_in_generate=True, output_scores=True)

    whole = run()
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 3)  # 4 pieces, some all padding in row 2
    pieces = run()
    assert torch.equal(pieces.sequences, whole.sequences)
    for a, b in zip(pieces.scores, whole.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2-untied", "llama-gqa-tied"])
def test_hf_style_left_padded_batch_matches_transformers(name, tmp_path):
    config = ModelConfig(**TINY[name])
    model = randomize(CausalLM.from_config(config), seed=5).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ours = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours, theirs)


# --- samplers on hand-made logits -------------------------------------------------------------

LOGITS = torch.log(torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]]))  # ranks: 1, 3, 4, 2, 0


def kept(logits):
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_top_p_min_p_keep_exactly_the_right_tokens():
    assert kept(filter_logits(LOGITS, top_k=2)) == [1, 3]
    assert kept(filter_logits(LOGITS, top_k=0)) == [0, 1, 2, 3, 4]
    # nucleus: 0.40 + 0.30 = 0.70 < 0.75, so the third most likely (0.15) is needed too
    assert kept(filter_logits(LOGITS, top_p=0.75)) == [1, 3, 4]
    assert kept(filter_logits(LOGITS, top_p=0.70)) == [1, 3]
    assert kept(filter_logits(LOGITS, top_p=0.01)) == [1]  # the best token always stays
    assert kept(filter_logits(LOGITS, top_p=1.0)) == [0, 1, 2, 3, 4]
    # min_p: keep p ≥ 0.3 × 0.40 = 0.12
    assert kept(filter_logits(LOGITS, min_p=0.3)) == [1, 3, 4]
    assert kept(filter_logits(LOGITS, top_k=3, min_p=0.5)) == [1, 3]
    # temperature divides the logits before any filtering
    assert torch.allclose(filter_logits(LOGITS, temperature=0.5), LOGITS * 2)


def test_filters_agree_with_transformers_warpers():
    from transformers.generation import logits_process as lp

    scores = torch.randn(4, 50)
    for ours, warper in [(dict(top_k=7), lp.TopKLogitsWarper(7)), (dict(top_p=0.6), lp.TopPLogitsWarper(0.6)),
                         (dict(min_p=0.1), lp.MinPLogitsWarper(0.1))]:
        expected = torch.isfinite(warper(None, scores.clone()))
        assert torch.equal(torch.isfinite(filter_logits(scores, **ours)), expected), ours


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores, history = torch.randn(2, 30), torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone())
    assert torch.allclose(apply_repetition_penalty(scores, seen, 1.3), expected)


def test_sampling_limits_seeds_and_return_sequences(llama, tokenizer):
    gen = Generator(llama, tokenizer)
    greedy = gen.generate("The quick", max_new_tokens=16, do_sample=False, eos_token_id=None).token_ids
    assert gen.generate("The quick", max_new_tokens=16, top_k=1, seed=3, eos_token_id=None).token_ids == greedy
    assert gen.generate("The quick", max_new_tokens=16, temperature=1e-4, top_k=0, seed=4,
                        eos_token_id=None).token_ids == greedy
    assert gen.generate("The quick", max_new_tokens=16, do_sample=True, temperature=0.0,
                        eos_token_id=None).token_ids == greedy
    a = gen.generate("The quick", max_new_tokens=16, temperature=1.5, seed=7, eos_token_id=None)
    b = gen.generate("The quick", max_new_tokens=16, temperature=1.5, seed=7, eos_token_id=None)
    c = gen.generate("The quick", max_new_tokens=16, temperature=1.5, seed=8, eos_token_id=None)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    five = gen.generate("The quick", max_new_tokens=16, num_return_sequences=5, seed=1, eos_token_id=None)
    assert len(five) == 5 and len({tuple(c.token_ids) for c in five}) == 5
    again = gen.generate("The quick", max_new_tokens=16, num_return_sequences=5, seed=1, eos_token_id=None)
    assert [c.token_ids for c in five] == [c.token_ids for c in again]


# --- streaming and stop rules -------------------------------------------------------------------

@settings(deadline=None, derandomize=True, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab é€😀🦊敏捷\n<>/")), max_size=40))
def test_text_deltas_never_split_characters_and_add_up(tokenizer, text):
    tracker = TextTracker(tokenizer)
    deltas = [tracker.push(i) for i in tokenizer.encode(text)] + [tracker.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # no half characters were ever emitted


@settings(deadline=None, derandomize=True, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab é😀<>/")), max_size=30),
       stop=st.sampled_from(["</b>", "é😀", "b b", "<"]))
def test_stop_strings_across_token_boundaries(tokenizer, text, stop):
    tracker = TextTracker(tokenizer, stop=[stop])
    deltas = []
    for i in tokenizer.encode(text):
        deltas.append(tracker.push(i))
        if tracker.stopped:
            break
    deltas.append(tracker.flush())
    expected = text[:text.find(stop)] if stop in text else text
    assert "".join(deltas) == expected
    assert tracker.stopped == (stop in text)


def test_stream_concatenation_equals_generate_text(llama, tokenizer):
    gen = Generator(llama, tokenizer)
    for seed in range(3):  # random weights emit arbitrary bytes: broken UTF-8 included
        full = gen.generate("敏捷的", max_new_tokens=40, temperature=1.0, top_k=0, seed=seed, eos_token_id=None)
        chunks = list(gen.stream_chunks("敏捷的", max_new_tokens=40, temperature=1.0, top_k=0, seed=seed,
                                        eos_token_id=None))
        assert "".join(c.text for c in chunks) == full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
        assert [c.token_id for c in chunks] == full.token_ids
        assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


def test_generate_honours_stop_strings_eos_lists_and_lengths(llama, tokenizer):
    gen = Generator(llama, tokenizer)
    free = gen.generate("The quick", max_new_tokens=30, do_sample=False, eos_token_id=None)
    # a stop string taken from the middle of the free-running text, spanning whatever tokens it spans
    stop = free.text[5:9]
    stopped = gen.generate("The quick", max_new_tokens=30, do_sample=False, eos_token_id=None, stop=[stop])
    assert stopped.text == free.text[:free.text.find(stop)] and stopped.finish_reason == "stop"
    assert "".join(gen.stream("The quick", max_new_tokens=30, do_sample=False, eos_token_id=None,
                              stop=stop)) == stopped.text
    # an eos list: stop at the first of several ids, which is not part of the completion
    at = next(i for i, t in enumerate(free.token_ids) if i and t not in free.token_ids[:i])  # its first new id
    eos = gen.generate("The quick", max_new_tokens=30, do_sample=False,
                       eos_token_id=[len(tokenizer) - 1, free.token_ids[at]])
    assert eos.token_ids == free.token_ids[:at] and eos.finish_reason == "stop"
    assert gen.generate("The quick", max_new_tokens=30, do_sample=False, eos_token_id=None,
                        stop_token_ids=[free.token_ids[at]]).token_ids == free.token_ids[:at]
    prompt_len = len(tokenizer.encode("The quick"))
    short = gen.generate("The quick", max_length=prompt_len + 4, do_sample=False, eos_token_id=None)
    assert short.token_ids == free.token_ids[:4] and short.finish_reason == "length"


def test_logprobs_are_the_models_distribution(llama, tokenizer):
    gen = Generator(llama, tokenizer)
    out = gen.generate("The quick", max_new_tokens=6, do_sample=False, eos_token_id=None, logprobs=3)
    prompt = tokenizer.encode("The quick")
    with torch.no_grad():
        logp = llama(torch.tensor([prompt + out.token_ids])).logits[0].log_softmax(-1)
    for step, info in enumerate(out.logprobs):
        row = logp[len(prompt) - 1 + step]
        assert info.token_id == out.token_ids[step] and math.isclose(info.logprob, row[info.token_id].item(), abs_tol=1e-4)
        assert [i for i, _, _ in info.top] == row.topk(3).indices.tolist()
        assert info.top[0][0] == info.token_id  # greedy picks the most likely
        assert info.top[0][1] == tokenizer.decode([info.token_id])


# --- configuration and validation -----------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(min_p=2.0), "min_p"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(num_return_sequences="3"), "num_return_sequences must be an integer"),
    (dict(stop=[""]), "stop"), (dict(logprobs=50), "at most"), (dict(eos_token_id=-3), "token ids"),
    (dict(do_sample=False, num_return_sequences=3), "do_sample=True"), (dict(beam_width=2), "unknown"),
    (dict(do_sample=True, seed=2**64), "seed must be below 2\\*\\*64"),
])
def test_invalid_settings_raise_config_error(llama, tokenizer, overrides, match):
    with pytest.raises(ConfigError, match=match):
        Generator(llama, tokenizer).generate("The quick", **{"max_new_tokens": 4, **overrides})


def test_context_overflow_names_prompt_request_and_window(llama, tokenizer):
    gen = Generator(llama, tokenizer)
    prompt = tokenizer.encode("The quick brown fox")
    with pytest.raises(ContextLengthError, match=f"{len(prompt)} prompt tokens \\+ 200 requested new tokens "
                                                 "exceed the model's context window of 128"):
        gen.generate(prompt, max_new_tokens=200)


def test_defaults_come_from_generation_config_json(tmp_path, llama, tokenizer):
    llama.generation_config = {"do_sample": True, "temperature": 0.8, "max_new_tokens": 7, "eos_token_id": None}
    try:
        llama.save_pretrained(tmp_path, tokenizer=tokenizer)
    finally:
        llama.generation_config = {}
    model = CausalLM.from_pretrained(tmp_path)
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.do_sample and config.temperature == 0.8 and config.max_new_tokens == 7
    out = Generator(model, tokenizer).generate("The quick", seed=0)
    assert isinstance(out, Completion) and len(out.token_ids) <= 7
    assert Generator(model, tokenizer).config.sampling


def test_prompts_as_tensors_and_malformed_input_ids(llama, tokenizer):
    gen = Generator(llama, tokenizer)
    ids = tokenizer.encode("The quick")
    alone = gen.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.generate(torch.tensor(ids), max_new_tokens=4, do_sample=False) == alone  # one prompt, not one per id
    assert gen.generate(torch.tensor([ids, ids]), max_new_tokens=4, do_sample=False) == [alone, alone]
    for bad, match in [([ids], "got list"), (torch.tensor([ids]).float(), "float32"), (torch.tensor([[ids]]), "shape"),
                       (torch.empty(0, 3, dtype=torch.long), "batch is empty")]:
        with pytest.raises(ConfigError, match=match):
            llama.generate(bad, max_new_tokens=2)


def test_plain_decoding_takes_the_packed_decode_step(llama, monkeypatch):
    """On CPU every decode step of a Llama-family model, greedy, sampled or beam search, goes
    through packing.DecodeStep: the fast path bench/generate.py measures."""
    from pocketlm import packing

    steps, real = [], packing.DecodeStep.__call__
    monkeypatch.setattr(packing.DecodeStep, "__call__", lambda self, *a, **kw: steps.append(1) or real(self, *a, **kw))
    gen = Generator(llama)
    for settings in (dict(do_sample=False), dict(do_sample=True, seed=0), dict(num_beams=2, do_sample=False)):
        steps.clear()
        gen.generate_ids(torch.tensor([[3, 4, 5]]), max_new_tokens=5, eos_token_id=None, **settings)
        assert len(steps) == 4, settings  # the prefill gives the first token, then one step per token


def test_streamer_callback_receives_every_step(llama):
    steps = []
    out = llama.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=5, do_sample=False, streamer=steps.append)
    assert torch.equal(torch.stack(steps, dim=1)[0], out[0, 3:])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile needs a C++ compiler")
def test_compiled_decode_step_gives_the_same_tokens():
    config = ModelConfig(**{**TINY["llama-mha-untied"], "n_layer": 1})
    model = randomize(CausalLM.from_config(config), seed=2).eval()
    prompt = torch.tensor([[1, 2, 3, 4]])
    eager = Generator(model).generate_ids(prompt, max_new_tokens=6, do_sample=False)
    compiled = Generator(model, compile=True)
    assert torch.equal(compiled.generate_ids(prompt, max_new_tokens=6, do_sample=False), eager)
    # a left-padded batch: the static step's key mask must hide the padding
    batch = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(compiled.generate_ids(batch, mask, max_new_tokens=6, do_sample=False),
                       Generator(model).generate_ids(batch, mask, max_new_tokens=6, do_sample=False))
