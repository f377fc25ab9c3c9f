"""Tests for pocketlm.tokenizer: the encode/decode round trip as a property, training, parity with
`transformers` on GPT-2 and SmolLM2-style folders, and typed errors for broken input."""

import json
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from pocketlm.errors import ConfigError, NotFoundError, TokenizerError
from pocketlm.tokenizer import BatchEncoding, Tokenizer

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 1000
EOT = "<|endoftext|>"
SMOL_SPECIALS = [
    EOT, "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
SAMPLES = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends",
    "def train(model, steps=1000):\n    return model.fit(x, y)  # 12345\n",
    "日本語のテキストと中文文本",
    "emoji 😀👍🏽 and a family 👩‍👩‍👧 and flags 🇯🇵",
    "numbers 3.14159 and 2024-01-31 and 1234567890",
    "e\u0301 combining marks \u0300\u0301\u0302",
    f"text with {EOT} inside and {EOT}{EOT} twice",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "NUL \x00 byte and \x7f delete",
]


def _corpus(seed: int = 0, target_chars: int = 300_000) -> str:
    """Varied training text: prose, code, CJK, emoji and numbers, repeated with variation."""
    rng = random.Random(seed)
    words = ("the of and to in is was that for it with as his on be at by had are but from not "
             "they this have which one you were her all she there would their we him been has when "
             "who will more no if out so said what up its about into than them can only other new "
             "time could some these two may then first any like now my such make over our even most "
             "model token train learn data text layer attention language small local machine").split()
    code = ["def {f}(x, y={n}):\n    return x * y + {n}\n", "for i in range({n}):\n    total += i\n",
            "class {F}:\n    def __init__(self):\n        self.{f} = [{n}, {n}]\n",
            "if {f} == {n}:\n\tprint(\"{f}\", {n})\n"]
    cjk = ["日本語の文章を書きます。", "中文文本的例子。", "机器学习和语言模型", "東京は大きな都市です。",
           "한국어 문장입니다."]
    emoji = ["😀", "👍🏽", "🎉", "🚀", "👩‍👩‍👧", "🇯🇵", "❤️"]
    parts, size = [], 0
    while size < target_chars:
        kind = rng.random()
        if kind < 0.55:
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
            piece = sentence.capitalize() + rng.choice([". ", "! ", "? ", ".\n", ", "])
        elif kind < 0.75:
            name = rng.choice(words) + "_" + rng.choice(words)
            piece = rng.choice(code).format(f=name, F=name.title().replace("_", ""), n=rng.randint(0, 9999))
        elif kind < 0.87:
            piece = "".join(rng.choice(cjk) for _ in range(rng.randint(1, 4))) + "\n"
        elif kind < 0.94:
            piece = " ".join(rng.choice(emoji) for _ in range(rng.randint(1, 5))) + " "
        else:
            piece = f"{rng.randint(0, 10**9)} {rng.randint(1900, 2100)}-{rng.randint(1, 12):02d} "
            piece += f"{rng.random():.4f}\n"
        parts.append(piece)
        size += len(piece)
    return "".join(parts)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus_file) -> Tokenizer:
    """Shared by read-only tests; tests that change settings load their own copy."""
    return Tokenizer.train([corpus_file], VOCAB_SIZE)


@pytest.fixture(scope="module")
def trained_dir(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    trained.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    trained.backend.model.save(str(folder))  # writes vocab.json + merges.txt
    return folder


@pytest.fixture(scope="module")
def smol_dir(corpus_file, tmp_path_factory) -> Path:
    """A folder laid out like SmolLM2-Instruct's tokenizer, with a vocabulary learned here."""
    backend = Backend(models.BPE(continuing_subword_prefix="", end_of_word_suffix=""))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=SMOL_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train([str(corpus_file)], trainer)
    folder = tmp_path_factory.mktemp("smol")
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "add_prefix_space": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 8192,
        "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOT,
        "vocab_size": 1200,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def by_name(trained, gpt2_dir, smol_dir) -> dict[str, Tokenizer]:
    return {"trained": trained, "gpt2": Tokenizer.from_pretrained(gpt2_dir),
            "smol": Tokenizer.from_pretrained(smol_dir)}


def _hf(folder: Path, cls=None):
    cls = cls or transformers.AutoTokenizer
    return cls.from_pretrained(str(folder), local_files_only=True)


# ----- round trip -------------------------------------------------------------------------


@st.composite
def tricky_text(draw) -> str:
    piece = st.one_of(
        st.sampled_from(["😀", "👍🏽", "👩‍👩‍👧", "🇯🇵", "日本語", "中文", "한국어", "\x00", "e\u0301",
                         "\u0300\u0301\u0302", "\u200b", "\ufeff", "\r\n", EOT, "<|im_start|>", "<|im_end"]),
        st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u3000"), min_size=1, max_size=300),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
        st.integers(0, 10**30).map(str),
    )
    return "".join(draw(st.lists(piece, max_size=25)))


@pytest.mark.parametrize("name", ["trained", "gpt2", "smol"])
@settings(deadline=None, derandomize=True, max_examples=300)
@given(text=st.text(alphabet=st.characters(codec="utf-8")))
def test_round_trip_any_unicode(by_name, name, text):
    tok = by_name[name]
    assert tok.decode(tok.encode(text, split_special_tokens=True)) == text


@pytest.mark.parametrize("name", ["trained", "gpt2", "smol"])
@settings(deadline=None, derandomize=True, max_examples=300)
@given(text=tricky_text())
def test_round_trip_tricky_text(by_name, name, text):
    tok = by_name[name]
    assert tok.decode(tok.encode(text, split_special_tokens=True)) == text


PATHOLOGICAL_SCRIPT = textwrap.dedent("""
    import sys
    from pocketlm.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(sys.argv[1])
    n = 1_000_000
    cases = {"a": "a" * n, "spaces": " " * n, "newlines": "\\n" * n, "emoji": "😀" * (n // 4),
             "digits": "7" * n, "alternating": "ab" * (n // 2), "word_space": "a " * (n // 2)}
    for name, text in cases.items():
        ids = tok.encode(text, split_special_tokens=True)
        assert tok.decode(ids) == text, name
        print(name, len(ids), len(text.encode()))
""")


@pytest.mark.parametrize("folder", ["trained_dir", "smol_dir"])
def test_pathological_megabyte_inputs_round_trip(request, folder):
    # A subprocess with a timeout guards against a hang; the time itself is not asserted.
    result = subprocess.run([sys.executable, "-c", PATHOLOGICAL_SCRIPT, str(request.getfixturevalue(folder))],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    counts = {name: (int(ids), int(nbytes)) for name, ids, nbytes in rows}
    assert len(counts) == 7
    for name, (ids, nbytes) in counts.items():
        assert 0 < ids <= nbytes, name
    if folder == "smol_dir":  # Digits(individual_digits=True) forbids any merge across digits
        assert counts["digits"][0] == 1_000_000


# ----- training ---------------------------------------------------------------------------


def test_trained_vocab_is_bounded_and_holds_every_byte(trained):
    assert 256 + 1 < len(trained) <= VOCAB_SIZE
    assert trained.vocab_size == len(trained)  # the special token lives in the model vocabulary
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(trained.get_vocab())


def test_trained_special_token_is_one_id_and_never_split(trained):
    eot = trained.eos_token_id
    assert trained.eos_token == EOT and trained.convert_ids_to_tokens(eot) == EOT
    ids = trained.encode(f"hello{EOT}world")
    assert ids.count(eot) == 1
    assert trained.decode(ids) == f"hello{EOT}world"
    assert trained.decode(ids, skip_special_tokens=True) == "helloworld"
    assert eot not in trained.encode(f"hello{EOT}world", split_special_tokens=True)
    assert trained.all_special_ids == [eot, trained.pad_token_id]  # trained tokenizers get <|pad|>


def test_training_learns_merges(trained):
    for word in [" the", " attention", " language", "return", "日本語"]:
        assert len(trained.encode(word)) < len(word.encode("utf-8")), word
    assert len(trained.encode(" the")) == 1


def test_train_from_iterator_matches_train_from_file(trained, corpus_file):
    lines = corpus_file.read_text(encoding="utf-8").splitlines(keepends=True)
    assert Tokenizer.train_from_iterator(lines, VOCAB_SIZE).get_vocab() == trained.get_vocab()


def test_train_rejects_bad_arguments(corpus_file, tmp_path):
    with pytest.raises(ConfigError, match="at least 258"):
        Tokenizer.train([corpus_file], 257, special_tokens=(EOT, "<pad>"), pad_token="<pad>")
    with pytest.raises(NotFoundError, match="missing.txt"):
        Tokenizer.train([corpus_file, tmp_path / "missing.txt"], VOCAB_SIZE)


# ----- parity with transformers -----------------------------------------------------------


def test_gpt2_folder_matches_transformers(gpt2_dir):
    ours, ref = Tokenizer.from_pretrained(gpt2_dir), _hf(gpt2_dir, transformers.GPT2TokenizerFast)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (ref.bos_token, ref.eos_token, ref.unk_token)
    assert len(ours) == len(ref)
    for text in SAMPLES:
        ids = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == ref.decode(ids), text


def test_smol_folder_matches_transformers(smol_dir):
    ours, ref = Tokenizer.from_pretrained(smol_dir), _hf(smol_dir)
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", EOT)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.model_max_length == ref.model_max_length == 8192
    assert ours.chat_template == ref.chat_template == CHATML_TEMPLATE
    assert (len(ours), ours.vocab_size) == (len(ref), ref.vocab_size)
    assert ours.get_vocab() == ref.get_vocab()
    for text in SAMPLES:
        ids = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        split = ref(text, split_special_tokens=True)["input_ids"]
        assert ours.encode(text, split_special_tokens=True) == split, text
        for skip in (False, True):
            want = ref.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == want, text


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("options", [
    dict(padding=True),
    dict(padding=True, truncation=True, max_length=7),
    dict(padding="max_length", truncation=True, max_length=40),
    dict(padding="longest", truncation=True, max_length=12, add_special_tokens=False),
])
def test_smol_batches_match_transformers(smol_dir, side, options):
    ours, ref = Tokenizer.from_pretrained(smol_dir), _hf(smol_dir)
    ours.padding_side = ref.padding_side = side
    batch = SAMPLES[1:8]
    got, want = ours(batch, return_tensors="pt", **options), ref(batch, return_tensors="pt", **options)
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.attention_mask, want["attention_mask"])
    assert ours.batch_decode(got.input_ids, skip_special_tokens=True) == \
        ref.batch_decode(want["input_ids"], skip_special_tokens=True)


def test_saved_folder_loads_in_transformers_with_same_ids(trained_dir):
    ours, ref = Tokenizer.from_pretrained(trained_dir), _hf(trained_dir)
    assert (ref.eos_token, ref.bos_token) == (EOT, None)
    assert (ref.model_max_length, ref.padding_side) == (1024, "right")
    for text in SAMPLES:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    config = json.loads((trained_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    assert json.loads((trained_dir / "special_tokens_map.json").read_text()) == \
        {"eos_token": EOT, "pad_token": "<|pad|>"}


def test_save_load_keeps_every_setting(smol_dir, tmp_path):
    tok = Tokenizer.from_pretrained(smol_dir)
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    ref = _hf(tmp_path)
    for loaded in (again, ref):
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == \
            (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
        assert (loaded.model_max_length, loaded.chat_template, loaded.padding_side) == \
            (8192, CHATML_TEMPLATE, "left")
    assert again.fingerprint() == tok.fingerprint()


# ----- calling conventions ----------------------------------------------------------------


@pytest.fixture
def tok(trained_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(trained_dir)


def test_call_shapes_and_batch_encoding(tok):
    single = tok("hello world")
    assert isinstance(single, BatchEncoding) and single.input_ids == single["input_ids"]
    assert single.attention_mask == [1] * len(single.input_ids)
    tensor = tok("hello world", return_tensors="pt").to("cpu")
    assert tensor.input_ids.shape == (1, len(single.input_ids)) and tensor.input_ids.dtype == torch.long
    assert tok.encode("hello world", return_tensors="pt").tolist() == [single.input_ids]
    array = tok(["ab", "cd"], return_tensors="np")
    assert isinstance(array.input_ids, np.ndarray) and array.input_ids.shape[0] == 2
    assert "attention_mask" not in tok("hi", return_attention_mask=False)
    with pytest.raises(AttributeError):
        single.token_type_ids


def test_padding_needs_a_pad_token(tok):
    tok.pad_token = None
    with pytest.raises(TokenizerError, match="pad_token = tokenizer.eos_token"):
        tok(["a", "a b c"], padding=True)
    tok.pad_token = tok.eos_token
    batch = tok(["a", "a b c"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, -1].item() == tok.pad_token_id == tok.eos_token_id
    assert batch.attention_mask[0].tolist() == [1, 0, 0, 0, 0][: batch.input_ids.shape[1]]


def test_ragged_batch_cannot_become_a_tensor(tok):
    with pytest.raises(TokenizerError, match="padding=True"):
        tok(["a", "a b c d"], return_tensors="pt")


def test_truncation_defaults_to_model_max_length(tok):
    tok.model_max_length = 5
    text = "the quick brown fox jumps over the lazy dog " * 3
    assert len(tok(text, truncation=True).input_ids) == 5
    assert len(tok(text, truncation=True, max_length=3).input_ids) == 3
    assert len(tok(text).input_ids) > 5  # like transformers, no truncation unless asked


def test_decode_accepts_lists_tensors_and_arrays(tok):
    ids = tok.encode("décodé 😀")
    assert tok.decode(torch.tensor(ids)) == tok.decode(torch.tensor([ids])) == "décodé 😀"
    assert tok.decode(np.array(ids, dtype=np.int64)) == "décodé 😀"
    assert tok.batch_decode(torch.tensor([ids, ids])) == ["décodé 😀"] * 2
    assert tok.batch_decode([ids, ids[:0]]) == ["décodé 😀", ""]
    with pytest.raises(TokenizerError):
        tok.decode([-100])


def test_pickled_copy_encodes_the_same(tok):
    tok.pad_token = tok.eos_token
    copy = pickle.loads(pickle.dumps(tok))
    assert copy(SAMPLES, padding=True) == tok(SAMPLES, padding=True)
    assert (copy.pad_token, copy.model_max_length) == (EOT, 1024)


def test_bad_call_arguments_raise_tokenizer_error(tok):
    for bad in (None, b"bytes", ["ok", 3]):
        with pytest.raises(TokenizerError):
            tok(bad)
    with pytest.raises(TokenizerError):
        tok("x", padding="sideways")
    with pytest.raises(TokenizerError):
        tok("x", return_tensors="tf")
    with pytest.raises(TokenizerError):
        tok.decode(None)


def test_decode_never_cleans_up_spaces(tok):
    text = "a , b . c ' s n't ?"
    assert tok.decode(tok.encode(text)) == text


def test_token_id_conversions(tok):
    assert tok.convert_tokens_to_ids(EOT) == tok.eos_token_id
    assert tok.convert_tokens_to_ids(["no-such-token"]) == [tok.unk_token_id]  # None: no unk here
    assert tok.convert_ids_to_tokens(tok.encode("the")) == ["the"]
    assert tok.all_special_tokens == [EOT, "<|pad|>"]


def test_special_token_setters_validate(tok):
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tok.pad_token = "<pad>"
    tok.bos_token = EOT
    assert tok.bos_token_id == tok.eos_token_id
    tok.bos_token = None
    assert tok.bos_token_id is None
    with pytest.raises(ConfigError):
        tok.padding_side = "middle"


def test_fingerprint_tracks_the_vocabulary(trained, trained_dir, by_name):
    fingerprint = trained.fingerprint()
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert Tokenizer.from_pretrained(trained_dir / "tokenizer.json").fingerprint() == fingerprint
    assert by_name["smol"].fingerprint() != fingerprint


# ----- loading configs and bad input ------------------------------------------------------


def _copy_tokenizer_json(src: Path, dst: Path, config: dict | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def test_config_variants_load(trained_dir, tmp_path):
    folder = _copy_tokenizer_json(trained_dir, tmp_path / "a", {
        "eos_token": {"content": EOT, "special": True}, "model_max_length": 1e30,
        "chat_template": [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}],
    })
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": EOT, "eos_token": "x"}))
    tok = Tokenizer.from_pretrained(folder)
    assert (tok.eos_token, tok.pad_token, tok.model_max_length, tok.chat_template) == (EOT, EOT, None, "T")
    (folder / "chat_template.jinja").write_text("from file", encoding="utf-8")
    assert Tokenizer.from_pretrained(folder).chat_template == "from file"
    huge = {"model_max_length": int(1e30), "unk_token": "<unk>"}
    tok = Tokenizer.from_pretrained(_copy_tokenizer_json(trained_dir, tmp_path / "b", huge))
    assert tok.model_max_length is None and tok.unk_token is None  # not in the vocabulary
    bare = Tokenizer.from_pretrained(_copy_tokenizer_json(trained_dir, tmp_path / "c"))
    assert (bare.bos_token, bare.eos_token, bare.unk_token) == (EOT, EOT, EOT)  # GPT-2 convention


def test_missing_paths_raise_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(NotFoundError, match="tokenizer.json.*merges.txt"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("content", [
    None,  # truncated: filled in below
    "this is not json",
    "[1, 2, 3]",
    '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}',
    '{"version": "1.0", "model": 7}',
])
def test_corrupt_tokenizer_json_raises_tokenizer_error(trained_dir, tmp_path, content):
    if content is None:
        content = (trained_dir / "tokenizer.json").read_text(encoding="utf-8")[:5000]
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("merges", [b"#version: 0.2\nonly-one-token\n", b"#version: 0.2\nzzqq qqzz\n",
                                    b"\xff\xfe\x00\x01 binary"])
def test_garbage_merges_raise_tokenizer_error(gpt2_dir, tmp_path, merges):
    (tmp_path / "vocab.json").write_bytes((gpt2_dir / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes(merges)
    with pytest.raises(TokenizerError, match="merges.txt"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_vocab_and_config_raise_tokenizer_error(gpt2_dir, trained_dir, tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": "zero"')
    (tmp_path / "merges.txt").write_bytes((gpt2_dir / "merges.txt").read_bytes())
    with pytest.raises(TokenizerError, match="vocab.json"):
        Tokenizer.from_pretrained(tmp_path)
    folder = _copy_tokenizer_json(trained_dir, tmp_path / "cfg")
    (folder / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"padding_side": "up"}')
    with pytest.raises(TokenizerError, match="padding_side"):
        Tokenizer.from_pretrained(folder)


def test_llama_style_bos_survives_truncation_like_transformers(smol_dir, tmp_path):
    """A template post-processor adds BOS (as Llama's tokenizer.json does); truncation keeps it."""
    backend = Backend.from_file(str(smol_dir / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B",
        special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": EOT}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, ref = Tokenizer.from_pretrained(tmp_path), _hf(tmp_path)
    for text in SAMPLES:
        for add in (True, False):
            want = ref(text, add_special_tokens=add)["input_ids"]
            assert ours(text, add_special_tokens=add)["input_ids"] == want, text
    options = dict(padding=True, truncation=True, max_length=4, return_tensors="pt")
    got, want = ours(SAMPLES[1:6], **options), ref(SAMPLES[1:6], **options)
    assert torch.equal(got.input_ids, want["input_ids"]) and got.input_ids[0, 0].item() == 1
    assert torch.equal(got.attention_mask, want["attention_mask"])
    assert ours.convert_tokens_to_ids(["no-such-token", "<|im_end|>"]) == \
        ref.convert_tokens_to_ids(["no-such-token", "<|im_end|>"]) == [0, 2]
