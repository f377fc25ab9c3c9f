"""The Hugging Face-style facade: the classic GPT-2 snippet, generate()'s argument semantics,
greedy parity with transformers, and clear errors for names that are not local checkpoints."""

import json
import logging

import pytest
import torch
import transformers

from conftest import TINY, randomize
from pocketlm import api
from pocketlm.api import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, GPT2Tokenizer
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, ContextLengthError, NotFoundError, TokenizerError
from pocketlm.tokenizer import Tokenizer

TEXT = ("Once upon a time there was a little model that wanted to learn to write stories. "
        "It read every book it could find, one token at a time, and once upon a time it wrote one. ") * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT)
    return Tokenizer.train([path], vocab_size=300, special_tokens=("<|endoftext|>",), eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    config = ModelConfig(**{**TINY["gpt2-tied"], "vocab_size": len(tokenizer),
                            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    model = api.CausalLM.from_config(config)
    randomize(model).save_pretrained(folder, tokenizer=tokenizer)
    return folder


def test_classic_snippet_runs_unchanged(gpt2_folder):
    path = str(gpt2_folder)
    torch.manual_seed(0)  # unseeded sampling draws from torch's global RNG, as in transformers
    tokenizer = GPT2Tokenizer.from_pretrained(path)
    model = GPT2LMHeadModel.from_pretrained(path)
    input_ids = tokenizer.encode("Once upon a time", return_tensors="pt")
    out = model.generate(input_ids, max_length=100, num_return_sequences=1, temperature=0.7)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert torch.equal(out[0, :input_ids.shape[1]], input_ids[0])
    assert out.shape[1] == 100 or tokenizer.eos_token_id in out[0].tolist()
    assert text.startswith("Once upon a time")
    torch.manual_seed(0)
    assert torch.equal(out, model.generate(input_ids, max_length=100, num_return_sequences=1, temperature=0.7))


def test_greedy_tokens_equal_transformers(tiny_config, tmp_path):
    torch.manual_seed(4)
    model = randomize(api.CausalLM.from_config(tiny_config)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    ours = model.generate(prompt, do_sample=False, max_new_tokens=20)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                         pad_token_id=0)
    assert ours.shape == (2, 25)
    assert torch.equal(ours, theirs)


def test_left_padded_batch_gives_each_prompt_its_own_greedy_tokens():
    model = randomize(api.CausalLM.from_config(ModelConfig(**TINY["llama-gqa-tied"]))).eval()
    short, long = torch.tensor([[5, 9, 11]]), torch.tensor([[7, 3, 2, 8, 1, 4]])
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), 1), long))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    together = model.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert torch.equal(together[0, 6:], model.generate(short, do_sample=False, max_new_tokens=8)[0, 3:])
    assert torch.equal(together[1, 6:], model.generate(long, do_sample=False, max_new_tokens=8)[0, 6:])


def test_sampling_parameters_without_do_sample_mean_sampling(gpt2_folder, caplog):
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder)
    prompt = torch.tensor([[1, 2, 3]])
    greedy = model.generate(prompt, max_new_tokens=15)  # nothing asked: greedy, as transformers
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=15))
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=15, do_sample=False, temperature=0.7))
    with caplog.at_level(logging.INFO, logger="pocketlm.generate"):
        samples = [model.generate(prompt, max_new_tokens=15, temperature=1.5, seed=s) for s in range(4)]
    assert "sampling because temperature" in caplog.text
    assert any(not torch.equal(s, greedy) for s in samples)
    assert torch.equal(samples[0], model.generate(prompt, max_new_tokens=15, temperature=1.5, seed=0))
    several = model.generate(prompt, max_new_tokens=15, num_return_sequences=4, seed=1)
    assert several.shape[0] == 4 and len({tuple(r) for r in several.tolist()}) > 1
    with pytest.raises(ConfigError, match="do_sample=True"):
        model.generate(prompt, do_sample=False, num_return_sequences=2)
    # top_k=1 keeps only the most likely token: sampling collapses to greedy
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=15, top_k=1, seed=3))


def test_generation_stops_at_eos_from_generation_config(gpt2_folder):
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder)
    prompt = torch.tensor([[4, 5, 6], [6, 5, 4]])
    free = model.generate(prompt, do_sample=False, max_new_tokens=10, eos_token_id=None)
    first = free[0, 3].item()
    stopped = model.generate(prompt, do_sample=False, max_new_tokens=10, eos_token_id=[999, first])
    # row 0 ends at its first token; row 1 runs on (padded after eos if it stops too)
    assert stopped[0, 3].item() == first and (stopped[0, 4:] == first).all()
    gc = json.loads((gpt2_folder / "generation_config.json").read_text())
    assert gc["eos_token_id"] == model.generation_config.eos_token_id


def test_generate_rejects_bad_arguments(gpt2_folder):
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder)
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ConfigError, match="unknown generation settings"):
        model.generate(prompt, beams=3)
    with pytest.raises(ConfigError, match="temperature"):
        model.generate(prompt, do_sample=True, temperature=-1.0)
    with pytest.raises(ConfigError, match="top_p"):
        model.generate(prompt, top_p=1.5)
    with pytest.raises(ContextLengthError, match="context window of 128"):
        model.generate(prompt, max_new_tokens=200)


def test_hub_names_without_local_copy_say_what_to_do():
    for load in (AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained):
        with pytest.raises(NotFoundError, match="does not download from a model hub"):
            load("gpt2")
    with pytest.raises(TypeError):
        AutoModelForCausalLM()


def test_from_pretrained_dtype_aliases_and_from_config(gpt2_folder):
    assert AutoModelForCausalLM.from_pretrained(gpt2_folder, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(gpt2_folder, dtype="float16").dtype == torch.float16
    with pytest.raises(ConfigError, match="disagree"):
        AutoModelForCausalLM.from_pretrained(gpt2_folder, dtype="float16", torch_dtype="bfloat16")
    baby = AutoModelForCausalLM.from_config("baby")
    assert baby.config == ModelConfig.preset("baby")


def test_tokenizer_larger_than_embedding_is_refused(tmp_path, tokenizer):
    model = api.CausalLM.from_config(ModelConfig(**TINY["llama-gqa-tied"]))  # vocab 96 < 300 tokens
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    with pytest.raises(TokenizerError, match="tokenizer has 300 tokens but the model embeds only 96"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_public_names_import_lazily():
    import pocketlm

    assert pocketlm.GPT2LMHeadModel is GPT2LMHeadModel
    assert pocketlm.LlamaForCausalLM is AutoModelForCausalLM
    with pytest.raises(AttributeError):
        pocketlm.NoSuchThing
