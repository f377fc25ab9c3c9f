"""The BERT encoder against transformers on tiny random configs, and all-MiniLM-L6-v2 (the
registry's `minilm-l6`, pulled from its PyPI wheel) against sentence-transformers: embeddings
within 1e-4; damaged folders give clear errors."""

import json
import shutil

import pytest
import torch

from pocketlm.encoder import BertConfig, BertModel, SentenceEncoder, pool
from pocketlm.errors import ConfigError, FormatError, NotFoundError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)


def _tiny_folder(tmp_path, act="gelu"):
    torch.manual_seed(0)
    reference = transformers.BertModel(transformers.BertConfig(**{**TINY, "hidden_act": act}),
                                       add_pooling_layer=True).eval()
    reference.save_pretrained(tmp_path)
    return reference


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_bert_hidden_states_equal_transformers(tmp_path, act):
    reference = _tiny_folder(tmp_path, act)
    ours = BertModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 99, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[0, 5:] = 1
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    got = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_pooling_modes_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, -1.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, "max"), torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, "mean_sqrt_len"), torch.tensor([[4.0, -2.0]]) / 2 ** 0.5)


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = ["A man is eating food.", "Someone is playing the violin!", "", "ümlaut café naïve — 東京",
             "Shall I compare thee to a summer's day? " * 60, "x", "The stock market fell sharply on Monday."]
    ours = SentenceEncoder.from_pretrained(minilm)
    reference = st.SentenceTransformer(str(minilm), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True, batch_size=3)
    got = ours.encode(texts, batch_size=3)
    assert got.shape == (len(texts), 384) and ours.dimension == 384
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert float(cosine.min()) > 1 - 1e-4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(texts)))
    assert torch.equal(ours.encode(texts[0]), got[0])  # one text alone: the same bits as in a batch
    sims = got @ got.T  # the related pair is closer than an unrelated one
    assert sims[0, 6] < 0.5 and ours.max_seq_length == 256


def test_damaged_encoder_folders(tmp_path):
    _tiny_folder(tmp_path / "ok")
    for name, change, error, message in [
        ("act", lambda f: _edit(f / "config.json", hidden_act="swish"), FormatError, "hidden_act"),
        ("heads", lambda f: _edit(f / "config.json", num_attention_heads=5), FormatError, "multiple"),
        ("type", lambda f: _edit(f / "config.json", model_type="gpt2"), FormatError, "not a BERT"),
        ("shape", lambda f: _edit(f / "config.json", intermediate_size=64), FormatError, "has shape"),
        ("weights", lambda f: (f / "model.safetensors").unlink(), NotFoundError, "model.safetensors"),
        ("junk", lambda f: (f / "model.safetensors").write_bytes(b"junk"), FormatError, "safetensors"),
    ]:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "ok", folder)
        change(folder)
        with pytest.raises(error, match=message):
            BertModel.from_pretrained(folder)
    (tmp_path / "ok" / "modules.json").write_text(json.dumps([{"type": "x.Transformer", "path": "../.."}]))
    with pytest.raises(FormatError, match="leaves the folder"):
        SentenceEncoder.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "modules.json").unlink()
    model = BertModel.from_pretrained(tmp_path / "ok")
    with pytest.raises(ConfigError, match="positions"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ConfigError, match="token ids"):
        model(torch.full((1, 3), 99))
    assert BertConfig.from_dict({**TINY}).hidden_size == 32


def _edit(path, **changes):
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_embed_command_prints_the_encoders_vectors(minilm, capsys, tmp_path):
    from pocketlm.cli import main

    (tmp_path / "texts.txt").write_text("first text\n\nsecond text\n")
    assert main(["embed", "--model", str(minilm), "zero", "--input", str(tmp_path / "texts.txt")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = SentenceEncoder.from_pretrained(minilm).encode(["zero", "first text", "second text"])
    assert len(rows) == 3 and all(len(r) == 384 for r in rows)
    torch.testing.assert_close(torch.tensor(rows), expected, rtol=0, atol=1e-6)
    assert main(["embed", "--model", str(minilm)]) == 2
    assert "nothing to embed" in capsys.readouterr().err


def test_feature_extraction_pipeline_matches_transformers(minilm, tmp_path):
    """pipeline("feature-extraction") gives transformers' nested [1][tokens][hidden] lists, for a
    BERT folder (MiniLM) and for a causal LM (its final normed hidden states)."""
    from conftest import TINY, randomize

    from pocketlm import ModelConfig, pipeline
    from pocketlm.api import CausalLM
    from pocketlm.tokenizer import Tokenizer

    (tmp_path / "t.txt").write_text("hello world the cat sat on the mat " * 100)
    tokenizer = Tokenizer.train([tmp_path / "t.txt"], vocab_size=300)
    randomize(CausalLM.from_config(ModelConfig(**{**TINY["gpt2-tied"], "vocab_size": 320}))).eval() \
        .save_pretrained(tmp_path / "gpt2", tokenizer=tokenizer)
    for folder in (minilm, tmp_path / "gpt2"):
        ours = pipeline("feature-extraction", model=str(folder))
        theirs = transformers.pipeline("feature-extraction", model=str(folder))
        for text in ("hello world, the cat", ["the mat", "sat on the mat"]):
            got, expected = ours(text), theirs(text)
            if isinstance(text, str):
                got, expected = [got], [expected]
            for a, b in zip(got, expected):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)
        assert ours("the cat", return_tensors=True).shape == torch.tensor(theirs("the cat")).shape
    with pytest.raises(ConfigError, match="does not know"):
        ours("x", pooling="mean")


def test_decoder_models_embed_by_mean_or_last_token(tmp_path, capsys):
    from conftest import TINY, randomize

    from pocketlm import ModelConfig
    from pocketlm.api import CausalLM
    from pocketlm.cli import main
    from pocketlm.encoder import DecoderEncoder, load_encoder
    from pocketlm.tokenizer import Tokenizer

    (tmp_path / "t.txt").write_text("hello world the cat sat on the mat " * 100)
    tokenizer = Tokenizer.train([tmp_path / "t.txt"], vocab_size=300)
    model = randomize(CausalLM.from_config(ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": 320}))).eval()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    encoder = load_encoder(tmp_path / "m", pooling="last")
    assert isinstance(encoder, DecoderEncoder) and encoder.dimension == 32
    ids = tokenizer.encode("the cat sat")
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(encoder.encode("the cat sat"), torch.nn.functional.normalize(hidden[-1], dim=0))
    mean = load_encoder(tmp_path / "m").encode(["the cat sat", "hello"])
    torch.testing.assert_close(mean[0], torch.nn.functional.normalize(hidden.mean(0), dim=0))
    assert main(["embed", "--model", str(tmp_path / "m"), "--pooling", "last", "the cat sat"]) == 0
    torch.testing.assert_close(torch.tensor(json.loads(capsys.readouterr().out)), encoder.encode("the cat sat"),
                               rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="'mean' or 'last'"):
        DecoderEncoder(model, tokenizer, pooling="cls")
