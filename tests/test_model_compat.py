"""transformers code that touches the model itself, run side by side on pocketlm and on
transformers (the pinned 5.24) with the same tiny random weights: forward's flags and outputs,
the manual KV-cache loop, model.config's names, embeddings and their resizing, parameter counts,
from_pretrained's loading keywords and save_pretrained's keywords."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub.serialization._base import parse_size_to_int

from conftest import TINY, randomize
from pocketlm import api, checkpoint
from pocketlm.api import AutoModelForCausalLM
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError
from pocketlm.model import KVCache

NAMES = ["gpt2-tied", "gpt2-untied", "llama-gqa-tied", "llama-mha-untied"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tmp_path_factory):
    """(pocketlm model, transformers model with eager attention, folder) holding the same weights."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    model = randomize(api.CausalLM.from_config(ModelConfig(**TINY[request.param]))).eval()
    model.save_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return model, hf, folder


def close(a, b, atol=1e-5):
    return a.shape == b.shape and (a - b).abs().max().item() <= atol


# --- forward -------------------------------------------------------------------------------------

def test_return_dict_false_gives_transformers_tuple(pair):
    model, hf, _ = pair
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        ours, theirs = model(ids, labels=ids, return_dict=False), hf(ids, labels=ids, return_dict=False)
        assert isinstance(ours, tuple) and close(ours[0], theirs[0]) and close(ours[1], theirs[1])
        # transformers returns its cache by default; pocketlm when asked (use_cache=True)
        ours = model(ids, use_cache=True, return_dict=False)
        theirs = hf(ids, return_dict=False)
    assert len(ours) == len(theirs) == 2 and close(ours[0], theirs[0]) and isinstance(ours[1], KVCache)


def test_output_object_reads_like_transformers(pair):
    model, hf, _ = pair
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        out, ref = model(ids, labels=ids, use_cache=True), hf(ids, labels=ids)
    assert list(out.keys()) == list(ref.keys()) == ["loss", "logits", "cache"]
    assert out["logits"] is out.logits and out[0] is out.loss and out[1] is out.logits and close(out[1], ref[1])
    assert out["past_key_values"] is out.past_key_values is out.cache and "past_key_values" in out
    with pytest.raises(KeyError):
        out["hidden_states"]


def test_hidden_states_match_transformers(pair):
    model, hf, _ = pair
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True).hidden_states
        theirs = hf(ids, output_hidden_states=True).hidden_states
        kept = model(ids, output_hidden_states=True, logits_to_keep=1)
    assert len(ours) == len(theirs) == model.config.n_layer + 1
    assert all(close(a, b) for a, b in zip(ours, theirs))  # the last one after the final norm
    assert kept.logits.shape[1] == 1 and close(kept.hidden_states[-1], ours[-1])


def test_attention_weights_match_transformers_eager(pair):
    model, hf, _ = pair
    ids = torch.randint(0, 96, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])  # left padding
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, output_attentions=True)
        theirs = hf(ids, attention_mask=mask, output_attentions=True)
    config = model.config
    assert len(ours.attentions) == config.n_layer
    for a, b in zip(ours.attentions, theirs.attentions):
        assert a.shape == (2, config.n_head, 6, 6)
        assert close(a[0, :, 2:], b[0, :, 2:]) and close(a[1], b[1])  # real queries; pad queries differ
    assert close(ours.logits[1], theirs.logits[1]) and close(ours.logits[0, 2:], theirs.logits[0, 2:])


def test_eager_and_sdpa_agree_and_the_default_stays_on_sdpa(pair, monkeypatch):
    model, _, _ = pair
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        eager = model(ids, output_attentions=True)
        monkeypatch.setattr("pocketlm.model.eager_attention", None)  # the default path must not need it
        fast = model(ids)
    assert close(eager.logits, fast.logits) and fast.attentions is None and fast.cache is None


def test_manual_cache_loop_matches_full_forward_and_transformers(pair):
    model, hf, _ = pair
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        out, ref = model(ids, use_cache=True), hf(ids, use_cache=True)
        seq = ids
        for _ in range(7):  # through two growths of the cache (5 → 10 → 20 positions)
            next_id = out.logits[:, -1:].argmax(-1)
            seq = torch.cat((seq, next_id), 1)
            out = model(next_id, past_key_values=out.past_key_values)
            ref = hf(next_id, past_key_values=ref.past_key_values)
            assert close(out.logits[:, -1], ref.logits[:, -1])
        assert close(out.logits[:, -1], model(seq).logits[:, -1])
    assert out.past_key_values.length == seq.shape[1]


def test_foreign_or_mismatched_caches_are_refused(pair):
    model, hf, _ = pair
    ids = torch.randint(0, 96, (2, 4))
    with torch.no_grad():
        hf_cache = hf(ids, use_cache=True).past_key_values
        with pytest.raises(ConfigError, match="past_key_values must be the cache"):
            model(ids[:, :1], past_key_values=hf_cache)
        cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(ConfigError, match="holds 2 rows but input_ids has 1"):
            model(ids[:1, :1], past_key_values=cache)
        other = KVCache(dataclasses.replace(model.config, n_layer=model.config.n_layer + 1), 2, 8)
        with pytest.raises(ConfigError, match="another shape"):
            model(ids[:, :1], past_key_values=other)


def test_mask_and_labels_of_the_wrong_shape_are_clear_errors(pair):
    model, _, _ = pair
    ids = torch.randint(0, 96, (2, 5))
    with pytest.raises(ConfigError, match="attention_mask has shape \\(3, 5\\)"):
        model(ids, attention_mask=torch.ones(3, 5))
    with pytest.raises(ConfigError, match="labels has shape \\(2, 4\\)"):
        model(ids, labels=ids[:, :4])


# --- model.config --------------------------------------------------------------------------------

ALIASES = {"gpt2": ["n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon", "activation_function"],
           "llama": ["num_key_value_heads", "intermediate_size", "rms_norm_eps", "head_dim", "hidden_act"]}


def test_config_answers_transformers_attribute_names(pair):
    model, hf, _ = pair
    ours, theirs = model.config, hf.config
    names = ["hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "vocab_size",
             "model_type", "tie_word_embeddings", "is_encoder_decoder", *ALIASES[ours.family]]
    assert {n: getattr(ours, n) for n in names} == {n: getattr(theirs, n) for n in names}
    assert ours.architectures == theirs.architectures
    if ours.family == "llama":
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    with pytest.raises(AttributeError):
        ours.hidden_size = 64  # read-only: the architecture is changed through ModelConfig's own fields


def test_aliases_stay_out_of_the_saved_config(tmp_path):
    config = ModelConfig(**TINY["llama-gqa-tied"])
    config.use_cache = True  # transformers code sets this; it is a setting, not architecture
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert ModelConfig(**TINY["llama-gqa-tied"]).use_cache is False
    api.CausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "use_cache" not in saved and "hidden_size" in saved  # llama's own layout, written as before
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert loaded.config.dtype == loaded.config.torch_dtype == torch.bfloat16


# --- embeddings and parameter counts -------------------------------------------------------------

def test_parameter_counts_match_transformers(pair):
    model, hf, _ = pair
    for m in (model, hf):
        m.model.layers[0].requires_grad_(False) if hasattr(m, "model") and hasattr(m.model, "layers") \
            else m.transformer.h[0].requires_grad_(False)
    try:
        for only_trainable in (False, True):
            for exclude_embeddings in (False, True):
                kw = dict(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
                assert model.num_parameters(**kw) == hf.num_parameters(**kw), kw
    finally:
        model.requires_grad_(True)
        hf.requires_grad_(True)


def test_embedding_accessors(pair):
    model, hf, _ = pair
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    assert type(model.get_input_embeddings()) is type(hf.get_input_embeddings())
    with pytest.raises(ConfigError, match="resize_token_embeddings"):
        model.set_input_embeddings(torch.nn.Embedding(10, model.config.n_embd))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("new_size, multiple", [(101, 8), (64, None)])
def test_resize_token_embeddings_like_transformers(name, new_size, multiple, tmp_path):
    torch.manual_seed(0)
    model = randomize(api.CausalLM.from_config(ModelConfig(**TINY[name]))).eval()
    model.save_pretrained(tmp_path / "before")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "before").eval()
    returned = model.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
    hf.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
    assert returned is model.get_input_embeddings()
    rows = hf.config.vocab_size
    assert model.config.vocab_size == returned.num_embeddings == model.lm_head.out_features == rows
    assert (model.lm_head.weight is returned.weight) == model.config.tie_embeddings
    # old rows kept; new rows at the old rows' mean, where transformers samples a 1e-9 covariance around it
    assert close(returned.weight, hf.get_input_embeddings().weight, atol=1e-3)
    assert close(model.lm_head.weight, hf.get_output_embeddings().weight, atol=1e-3)
    ids = torch.randint(0, rows, (1, 6))
    model.save_pretrained(tmp_path / "after")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "after").eval()
    with torch.no_grad():
        assert close(model(ids).logits, reloaded(ids).logits, atol=1e-4)
    greedy = model.generate(ids, do_sample=False, max_new_tokens=4)  # the packed decode path too
    assert torch.equal(greedy, reloaded.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                 max_new_tokens=4, pad_token_id=0))


def test_resize_refuses_to_drop_a_special_token():
    model = api.CausalLM.from_config(ModelConfig(**TINY["llama-gqa-tied"], eos_token_id=90))
    with pytest.raises(ConfigError, match="eos_token_id=90"):
        model.resize_token_embeddings(80)
    assert model.config.vocab_size == 96 and model.get_input_embeddings().num_embeddings == 96


# --- from_pretrained keywords --------------------------------------------------------------------

@pytest.mark.parametrize("keywords", [
    dict(device_map="auto"), dict(device_map="cpu"), dict(device_map={"": "cpu"}),
    dict(device_map={"model": "cpu", "lm_head": "cpu"}), dict(device_map=torch.device("cpu"), device="cpu"),
    dict(local_files_only=True), dict(low_cpu_mem_usage=True), dict(low_cpu_mem_usage=False),
    dict(revision="main"), dict(cache_dir="/nonexistent/cache"), dict(attn_implementation="sdpa"),
    dict(attn_implementation="eager"), dict(torch_dtype="auto"), dict(dtype="auto"),
])
def test_loading_keywords_transformers_accepts(pair, keywords):
    model, hf, folder = pair
    loaded = AutoModelForCausalLM.from_pretrained(folder, **keywords)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, **{k: v for k, v in keywords.items()
                                                                          if k != "device"})
    assert loaded.device == theirs.device and loaded.dtype == theirs.dtype
    assert loaded.attn_implementation == theirs.config._attn_implementation
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert close(loaded(ids).logits, theirs(ids).logits)


@pytest.fixture
def weights_never_read(monkeypatch):
    def read(*args, **kwargs):
        raise AssertionError("weights were read before the settings were checked")
    monkeypatch.setattr(checkpoint, "_read_weights", read)


@no_cuda
@pytest.mark.parametrize("keywords", [dict(device="cuda"), dict(device_map="cuda"), dict(device="cuda:1"),
                                      dict(device_map={"": 0})])
def test_cuda_without_a_gpu_says_use_cpu_before_reading_weights(pair, keywords, weights_never_read):
    with pytest.raises(ConfigError, match="no CUDA GPU.*'cpu'"):
        AutoModelForCausalLM.from_pretrained(pair[2], **keywords)
    if "device" in keywords:
        with pytest.raises(ConfigError, match="no CUDA GPU.*'cpu'"):
            AutoModelForCausalLM.from_config(pair[0].config, **keywords)


@pytest.mark.parametrize("keywords, message", [
    (dict(device_map={"model": "cpu", "lm_head": "meta"}), "one device"),
    (dict(device="cpu", device_map="meta"), "different devices"),
    (dict(device="tpu"), "not a device"),
    (dict(revision="v1.0"), "no revisions"),
    (dict(attn_implementation="bogus"), "'sdpa'.*'eager'"),
    (dict(dtype="float16", torch_dtype="bfloat16"), "disagree"),
    (dict(max_memory={0: "1GB"}, use_flash=True), r"max_memory, use_flash; it takes .*device_map"),
])
def test_loading_keywords_that_cannot_apply_are_clear_errors(pair, keywords, message, weights_never_read):
    with pytest.raises(ConfigError, match=message):
        AutoModelForCausalLM.from_pretrained(pair[2], **keywords)


def test_flash_attention_falls_back_to_sdpa_and_remote_code_is_never_run(pair, caplog):
    with caplog.at_level(logging.WARNING):
        model = AutoModelForCausalLM.from_pretrained(pair[2], attn_implementation="flash_attention_2",
                                                     trust_remote_code=True)
    assert model.attn_implementation == "sdpa"
    assert "uses 'sdpa'" in caplog.text and "never runs code" in caplog.text


# --- save_pretrained keywords --------------------------------------------------------------------

@pytest.mark.parametrize("size", ["200KB", "50kb", "0.05MB", "1GB", 40_000])
def test_shard_sizes_read_as_transformers_reads_them(size):
    assert checkpoint.parse_size(size) == (size if isinstance(size, int) else parse_size_to_int(size))


@pytest.mark.parametrize("size", ["5", "big", "0KB", 0, -3])
def test_bad_shard_sizes_are_clear_errors(size):
    with pytest.raises(ConfigError, match="max_shard_size"):
        checkpoint.parse_size(size)


def test_sharded_save_with_a_size_string_loads_in_transformers(pair, tmp_path):
    model, hf, _ = pair
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    for shard in shards:
        header, start = checkpoint.read_safetensors_header(tmp_path / shard)
        assert (tmp_path / shard).stat().st_size - start <= 50_000 or len(header) == 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert close(reloaded(ids).logits, hf(ids).logits)


def test_safe_serialization_false_still_writes_no_pickle(pair, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        pair[0].save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]
    assert "safetensors only" in caplog.text


def test_push_to_hub_and_unknown_keywords_are_refused_before_writing(pair, tmp_path):
    with pytest.raises(ConfigError, match="does not upload"):
        pair[0].save_pretrained(tmp_path / "new", push_to_hub=True)
    with pytest.raises(ConfigError, match="variant; it takes tokenizer, max_shard_size"):
        pair[0].save_pretrained(tmp_path / "new", variant="fp16")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_into_a_new_folder_leaves_no_folder(pair, tmp_path, monkeypatch, failure):
    def broken_save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise failure

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    with pytest.raises(type(failure)):
        pair[0].save_pretrained(tmp_path / "parent" / "new")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the parent it would have made
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(type(failure)):
        pair[0].save_pretrained(tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


def test_saving_over_a_file_is_a_clear_error(pair, tmp_path):
    (tmp_path / "model").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        pair[0].save_pretrained(tmp_path / "model")
