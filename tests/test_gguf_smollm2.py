"""The real SmolLM2-135M-Instruct Q4_1 GGUF (from its PyPI wheel) read by pocketlm against
transformers' own GGUF loading of the same file: tensors, logits, greedy tokens, tokenization and
the chat template."""

import math

import pytest
import torch
import transformers

from pocketlm import quant
from pocketlm.generate import Generator
from pocketlm.gguf import GGUFFile, load_gguf, tokenizer_from_gguf
from pocketlm.quant import QuantizedLinear

TEXTS = ["What is the capital of France?", "def f(x):\n    return x**2  # 12345 67",
         "敏捷的棕色狐狸 🦊 café naïve", "  leading   spaces\n\n\ttabs", "<|im_start|>user\nhi<|im_end|>",
         "It's 3.14159 — isn't it? ¿Sí? Ünïcödé", ""]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    with GGUFFile(smollm2_gguf) as f:
        tokenizer = tokenizer_from_gguf(f)
    return load_gguf(smollm2_gguf), tokenizer


@pytest.fixture(scope="module")
def theirs(smollm2_gguf):
    transformers.logging.set_verbosity_error()
    kwargs = dict(gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)


def test_every_weight_equals_transformers_dequantization(ours, theirs, smollm2_gguf):
    model, reference = ours[0], theirs[0].state_dict()
    # loaded for inference, the Q4_1 layers and the Q8_0 embedding (= tied head) stay in blocks...
    assert quant.quantized_bits(model) == {**{f"model.layers.{i}.{part}": 4 for i in range(30) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}, "model.embed_tokens": 8}
    weights = {name + ".weight": m.dequantize() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    weights.update((name, t) for name, t in model.state_dict().items() if name.endswith(".weight"))
    # ...holding exactly the weights transformers dequantizes, as does a float32 load
    floats = load_gguf(smollm2_gguf, dtype=torch.float32).state_dict()
    assert set(weights) == set(reference) == set(floats)
    for name, tensor in weights.items():
        assert torch.allclose(tensor, reference[name], rtol=0, atol=1e-6), name
        assert torch.equal(tensor, floats[name]), name


def test_config_from_metadata(ours):
    config = ours[0].config
    assert (config.n_layer, config.n_head, config.n_kv_head, config.n_embd, config.head_dim) == (30, 9, 3, 576, 64)
    assert config.tie_embeddings and config.rope_theta == 100000.0 and config.max_position == 8192
    assert ours[0].num_parameters() == 134_515_008


def test_logits_and_greedy_tokens_match_transformers(ours, theirs, smollm2_gguf):
    # float32, as transformers computes (kept in blocks, decoding rounds activations to int8, whose
    # answers test_quant_quality checks against this same float model)
    model, tokenizer = load_gguf(smollm2_gguf, dtype=torch.float32), ours[1]
    ids = torch.tensor([theirs[1].encode("The quick brown fox jumps over the lazy dog, and then the " * 3)[:32]])
    with torch.no_grad():
        assert (model(ids).logits - theirs[0](ids).logits).abs().max() < 1e-3
    expected = theirs[0].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                  min_new_tokens=32, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    got = Generator(model, tokenizer).generate_ids(ids, do_sample=False, max_new_tokens=32, eos_token_id=None)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_matches_transformers(ours, theirs, text):
    assert ours[1].encode(text) == theirs[1].encode(text)
    assert ours[1].decode(ours[1].encode(text)) == text


def test_special_tokens_and_chat_template(ours, theirs):
    tokenizer, reference = ours[1], theirs[1]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 🦊"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    for generation_prompt in (False, True):
        expected = reference.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                             tokenize=False) == expected
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)["input_ids"] == \
            reference.encode(expected, add_special_tokens=False)


def test_from_pretrained_and_cli_take_the_gguf_file(smollm2_gguf, ours, capsys):
    from pocketlm import AutoModelForCausalLM, AutoTokenizer
    from pocketlm.cli import main

    model, tokenizer = AutoModelForCausalLM.from_pretrained(smollm2_gguf), AutoTokenizer.from_pretrained(smollm2_gguf)
    ids = torch.tensor([tokenizer.encode("Hello there")])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ours[0](ids).logits, atol=1e-4)  # ours is packed by now
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2  # <|im_end|> ends a turn
    assert main(["generate", str(smollm2_gguf), "What is the capital of France?", "--chat", "--greedy",
                 "--max-new-tokens", "20", "--no-stream"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_convert_writes_a_folder_transformers_runs_the_same(smollm2_gguf, ours, theirs, tmp_path, capsys):
    from pocketlm.cli import main

    out = tmp_path / "smollm2-hf"
    assert main(["convert", str(smollm2_gguf), str(out)]) == 0
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) != "0o600"  # an ordinary file
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tokenizer.encode(text) == theirs[1].encode(text)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    expected = theirs[0].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    assert got.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(got[0, ids.shape[1]:], skip_special_tokens=True)


def test_perplexity_agrees_with_the_transformers_method(ours, theirs):
    """`pocketlm eval`'s sliding window against the loop in the transformers documentation
    (loss × (valid targets − 1) per window), run on transformers' own model: within 1%."""
    from pocketlm.evaluate import perplexity

    text = ("Perplexity is defined as the exponentiated average negative log-likelihood of a sequence. "
            "It is one of the most common metrics for evaluating language models, and a fixed-length "
            "model cannot condition on the whole history, so the text is scored in windows. ") * 6
    ids = torch.tensor([theirs[1].encode(text)])
    max_length, stride = 128, 64
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = theirs[0](input_ids, labels=target_ids).loss
        valid = int((target_ids != -100).sum()) - target_ids.size(0)
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    reference = math.exp(nll_sum / n_tokens)
    got = perplexity(ours[0], ids[0], max_length=max_length, stride=stride).perplexity
    assert abs(got - reference) / reference < 0.01, (got, reference)


def test_auto_config_of_the_gguf_answers_as_transformers_config(smollm2_gguf, theirs):
    from pocketlm import AutoConfig

    mine, reference = AutoConfig.from_pretrained(smollm2_gguf), theirs[0].config
    for name in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(mine, name) == getattr(reference, name), name
    assert mine.rope_theta == reference.rope_parameters["rope_theta"]
