"""Everyday transformers tokenizer code on pocketlm, side by side with transformers 5.24 loading
the same folder: loading keywords, token setters, tokenize, pairs, offsets, lengths, padding,
pad(), added tokens, decode clean-up and apply_chat_template. Each test runs the same calls on
both and compares the outputs; deliberate differences are asserted as such and named."""

import json
import random

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from pocketlm import api
from pocketlm.errors import ConfigError, PocketLMError, TokenizerError
from pocketlm.tokenizer import PAD, Tokenizer

transformers = pytest.importorskip("transformers")

EOT = "<|endoftext|>"
WORDS = ("the of and to in is was that for it with as his on be at by had are but from not they this "
         "have which one you hello world model token , . ? ! ' s n't").split()
TEXTS = ["the of and", "hello world, it is a model.", "x", "", "  spaces  and\ttabs\n",
         "the token <|endoftext|> inside", "émoji 😀 and 中文", "it ' s n't ?"]
TEMPLATE = (  # reads tools, documents, a keyword variable and the special tokens
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if tools %}TOOLS{{ tools | tojson }}{% endif %}{% if documents %}DOCS{{ documents | length }}{% endif %}"
    "{% if enable_thinking is defined %}think={{ enable_thinking }}{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHATS = [[{"role": "user", "content": "the of and"}],
         [{"role": "user", "content": "x"}, {"role": "assistant", "content": "hello world"}]]


def _corpus(n: int = 1500) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tokenizer trained by pocketlm with its defaults (so it has <|pad|>) and a chat template."""
    tok = Tokenizer.train_from_iterator(_corpus(), 400)
    tok.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("trained")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2's layout: a byte-level BPE tokenizer.json, <|endoftext|> as bos/eos/unk, no pad token."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder = tmp_path_factory.mktemp("gpt2")
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "model_max_length": 1024, "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory):
    """Llama's habit: the post-processor puts <s> before the text, and </s> between pair parts."""
    tok = Tokenizer.train_from_iterator(_corpus(), 400, special_tokens=("<s>", "</s>"), bos_token="<s>",
                                        eos_token="</s>")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B:1", special_tokens=[("<s>", bos), ("</s>", eos)])
    folder = tmp_path_factory.mktemp("bos")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    """A WordPiece tokenizer whose config asks for clean_up_tokenization_spaces."""
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(_corpus(), trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]"], show_progress=False))
    folder = tmp_path_factory.mktemp("wordpiece")
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]",
              "clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def both(folder, **kwargs):
    """(pocketlm's tokenizer, transformers') loaded from one folder with the same keywords."""
    return (api.AutoTokenizer.from_pretrained(folder, **kwargs),
            transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs))


def same(got, want):
    """Equal outputs: BatchEncodings key by key (tensors by value), lists and strings as they are."""
    if hasattr(want, "keys"):
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want.keys():
            same(got[key], want[key])
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    else:
        assert got == want


# ----- loading ------------------------------------------------------------------------------


def test_from_pretrained_keywords_apply_as_in_transformers(gpt2_dir, tmp_path):
    keywords = dict(padding_side="left", use_fast=True, local_files_only=True, trust_remote_code=False,
                    revision="main", cache_dir=str(tmp_path), model_max_length=7, pad_token=EOT)
    ours, ref = both(gpt2_dir, **keywords)
    assert (ours.padding_side, ours.model_max_length, ours.pad_token, ours.pad_token_id) == \
        (ref.padding_side, ref.model_max_length, ref.pad_token, ref.pad_token_id) == ("left", 7, EOT, 0)
    same(ours(TEXTS, padding=True, truncation=True), ref(TEXTS, padding=True, truncation=True))
    # a special token the vocabulary lacks is added, as transformers adds it
    ours, ref = both(gpt2_dir, pad_token="<pad>", additional_special_tokens=["<tool>"])
    assert (len(ours), ours.pad_token_id, ours.convert_tokens_to_ids("<tool>")) == \
        (len(ref), ref.pad_token_id, ref.convert_tokens_to_ids("<tool>"))
    same(ours(["<tool> the", "x"], padding=True), ref(["<tool> the", "x"], padding=True))


def test_from_pretrained_refuses_what_it_cannot_do(gpt2_dir):
    with pytest.raises(ConfigError, match="does not know.*bogus.*padding_side"):
        api.AutoTokenizer.from_pretrained(gpt2_dir, bogus=1)
    with pytest.raises(ConfigError, match="revision"):  # no hub, so no revisions
        api.AutoTokenizer.from_pretrained(gpt2_dir, revision="v1.0")
    with pytest.raises(ConfigError, match="padding_side"):
        api.AutoTokenizer.from_pretrained(gpt2_dir, padding_side="middle")
    with pytest.raises(ConfigError, match="model_max_length"):
        api.AutoTokenizer.from_pretrained(gpt2_dir, model_max_length=-3)
    with pytest.raises(PocketLMError):
        api.AutoTokenizer.from_pretrained(gpt2_dir, subfolder="nowhere")


# ----- special tokens -----------------------------------------------------------------------


def test_token_and_id_setters_match_transformers(gpt2_dir):
    ours, ref = both(gpt2_dir)
    for tok in (ours, ref):
        tok.pad_token_id = 5
        tok.eos_token_id = 6
    assert (ours.pad_token, ours.eos_token, ours.pad_token_id) == (ref.pad_token, ref.eos_token, 5)
    for tok in (ours, ref):
        tok.pad_token = EOT
    assert ours.pad_token_id == ref.pad_token_id == 0
    same(ours(TEXTS, padding=True), ref(TEXTS, padding=True))
    # deliberate: transformers keeps a token that is not in the vocabulary (its id None, padding
    # fails later); pocketlm says so at once
    with pytest.raises(TokenizerError, match="add_special_tokens"):
        ours.pad_token = "<nope>"
    with pytest.raises(TokenizerError, match="not an id"):
        ours.pad_token_id = 10**6
    with pytest.raises(TokenizerError, match="not an id"):
        ours.bos_token_id = "0"
    ours.pad_token_id = None
    assert ours.pad_token is None


def test_add_special_tokens_and_add_tokens_match_transformers(gpt2_dir):
    ours, ref = both(gpt2_dir)
    request = {"pad_token": "<pad>", "additional_special_tokens": ["<a>", "<b>"]}
    assert ours.add_special_tokens(request) == ref.add_special_tokens(request) == 3
    assert ours.add_special_tokens({"pad_token": "<pad>"}) == ref.add_special_tokens({"pad_token": "<pad>"}) == 0
    assert ours.add_tokens(["hello!", "newword", "newword"]) == ref.add_tokens(["hello!", "newword", "newword"]) == 2
    assert ours.add_tokens("zz") == ref.add_tokens("zz") == 1
    assert ours.add_tokens(["<sp>"], special_tokens=True) == ref.add_tokens(["<sp>"], special_tokens=True) == 1
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab() and ours.pad_token_id == ref.pad_token_id
    text = "say hello! newword <a>x<sp> zz the<b>"
    assert ours.tokenize(text) == ref.tokenize(text)
    ids = ref(text)["input_ids"]
    assert ours(text)["input_ids"] == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    same(ours([text, "x"], padding=True, return_tensors="pt"), ref([text, "x"], padding=True, return_tensors="pt"))
    # deliberate: a token the vocabulary already has adds no id, and pocketlm counts ids
    # (transformers counts it as 1, though len(tokenizer) does not change)
    before = len(ours)
    assert ours.add_tokens(["the"]) == 0 and len(ours) == before


# ----- tokenize, pairs, offsets, lengths, padding ---------------------------------------------


@pytest.mark.parametrize("folder", ["gpt2_dir", "bos_dir"])
def test_tokenize_and_convert_tokens_to_string(request, folder):
    ours, ref = both(request.getfixturevalue(folder))
    for text in TEXTS:
        assert ours.tokenize(text) == ref.tokenize(text), text
        assert ours.tokenize(text, add_special_tokens=True) == ref.tokenize(text, add_special_tokens=True), text
        assert ours.tokenize(text, "and a pair") == ref.tokenize(text, "and a pair"), text
        tokens = ref.tokenize(text)
        assert ours.convert_tokens_to_string(tokens) == ref.convert_tokens_to_string(tokens), text


PAIR_CALLS = [
    (("the of and", "hello world"), {}),
    (("the of and", "hello world"), dict(return_token_type_ids=True)),
    ((["the of and it is", "x"], ["hello", "world to the of"]), dict(truncation=True, max_length=5)),
    ((["the of and it is", "x"], ["hello", "world to the of"]), dict(truncation="only_first", max_length=9)),
    ((["the of and it is", "x"], ["hello", "world to the of"]), dict(max_length=4)),  # max_length alone truncates
    (([["the of", "and"], ["x", "hello world"]],), dict(padding=True, return_tensors="pt")),
    ((["the of and", "x"], ["hello", "world"]), dict(padding=True, return_offsets_mapping=True)),
]


@pytest.mark.parametrize("folder", ["gpt2_dir", "bos_dir"])
@pytest.mark.parametrize("args,options", PAIR_CALLS)
def test_text_pairs_match_transformers(request, folder, args, options):
    ours, ref = both(request.getfixturevalue(folder), pad_token="<pad>")
    same(ours(*args, **options), ref(*args, **options))  # token_type_ids only when asked for, as there
    if isinstance(args[0], str):
        assert ours.encode(*args) == ref.encode(*args)


CALL_OPTIONS = [
    dict(return_offsets_mapping=True),
    dict(return_length=True),
    dict(return_length=True, return_tensors="pt", padding=True),
    dict(padding=True, pad_to_multiple_of=4, return_length=True),
    dict(padding=True, pad_to_multiple_of=4, padding_side="left", return_offsets_mapping=True, return_tensors="pt"),
    dict(padding="max_length", max_length=12, truncation=True, return_special_tokens_mask=True),
    dict(padding="max_length", max_length=8, pad_to_multiple_of=4, truncation=True, return_tensors="np"),
    dict(truncation=True, max_length=3, return_offsets_mapping=True, return_length=True),
]


@pytest.mark.parametrize("folder", ["gpt2_dir", "bos_dir", "trained_dir"])
@pytest.mark.parametrize("options", CALL_OPTIONS)
def test_call_options_match_transformers(request, folder, options):
    ours, ref = both(request.getfixturevalue(folder), pad_token="<pad>")
    got, want = ours(TEXTS, **options), ref(TEXTS, **options)
    if options.get("return_tensors") == "np":
        assert sorted(got) == sorted(want.keys()) and all((got[k] == want[k]).all() for k in got)
    else:
        same(got, want)
    if not options.get("return_tensors"):
        same(ours(TEXTS[1], **options), ref(TEXTS[1], **options))


def test_pad_to_multiple_must_agree_with_truncation(gpt2_dir):
    ours, ref = both(gpt2_dir, pad_token=EOT)
    options = dict(padding="max_length", truncation=True, max_length=6, pad_to_multiple_of=4)
    with pytest.raises(ValueError, match="multiple"):
        ref(TEXTS, **options)
    with pytest.raises(TokenizerError, match="multiple"):
        ours(TEXTS, **options)


def test_pair_that_cannot_be_truncated_is_a_tokenizer_error(gpt2_dir):
    ours, ref = both(gpt2_dir)
    with pytest.raises(Exception, match="too short"):
        ref(["the of and it is"], ["x"], truncation="only_second", max_length=2)
    with pytest.raises(TokenizerError, match="too short"):
        ours(["the of and it is"], ["x"], truncation="only_second", max_length=2)


PAD_CALLS = [
    (lambda tok: [tok("the of and"), tok("x")], {}),
    (lambda tok: [tok("the of and"), tok("x")], dict(return_tensors="pt", padding_side="left")),
    (lambda tok: {"input_ids": [[1, 2, 3], [4]]}, dict(padding="max_length", max_length=5, return_tensors="pt")),
    (lambda tok: {"input_ids": [[1, 2, 3], [4]]}, dict(pad_to_multiple_of=4)),
    (lambda tok: {"input_ids": [1, 2, 3]}, dict(padding="max_length", max_length=5)),
    (lambda tok: {"input_ids": [1, 2, 3]}, dict(return_tensors="pt")),
    (lambda tok: [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}], {}),
    (lambda tok: [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]}, {"input_ids": [4], "attention_mask": [1]}],
     dict(padding="longest", max_length=2)),
    (lambda tok: {"input_ids": [torch.tensor([1, 2, 3]), torch.tensor([4])]}, dict(return_tensors="pt")),
    (lambda tok: {"input_ids": [[1, 2, 3], [4]]}, dict(return_attention_mask=False)),
    (lambda tok: tok(["the of", "x"], return_token_type_ids=True, return_special_tokens_mask=True), {}),
    (lambda tok: {"input_ids": [[1, 2], [4]], "token_type_ids": [[0, 1], [1]]}, dict(padding_side="left")),
]


@pytest.mark.parametrize("make,options", PAD_CALLS)
def test_pad_matches_transformers(gpt2_dir, make, options):
    ours, ref = both(gpt2_dir, pad_token=EOT)
    same(ours.pad(make(ours), **options), ref.pad(make(ref), **options))


def test_pad_pads_offsets_as_the_call_does(gpt2_dir):
    # deliberate: transformers' pad() leaves offset_mapping ragged (so no tensor can be made of
    # it); pocketlm pads it with (0, 0) as the tokenizer call itself does
    ours, ref = both(gpt2_dir, pad_token=EOT)
    rows = [ours("the of and", return_offsets_mapping=True), ours("x", return_offsets_mapping=True)]
    assert ours.pad(rows)["offset_mapping"] == ref(["the of and", "x"], padding=True,
                                                   return_offsets_mapping=True)["offset_mapping"]
    assert ours.pad(rows, return_tensors="pt")["offset_mapping"].shape == (2, 3, 2)


def test_pad_refuses_what_it_cannot_pad(gpt2_dir):
    ours = api.AutoTokenizer.from_pretrained(gpt2_dir, pad_token=EOT)
    for bad in ({"labels": [[1]]}, [], 3, [{"input_ids": [1]}, {"labels": [1]}], {"input_ids": [["a"]]}):
        with pytest.raises(TokenizerError):
            ours.pad(bad)
    with pytest.raises(TokenizerError, match="labels"):  # ragged labels cannot become a tensor
        ours.pad([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [1], "labels": [1]}], return_tensors="pt")


# ----- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["gpt2_dir", "wordpiece_dir"])
def test_decode_clean_up_matches_transformers(request, folder):
    ours, ref = both(request.getfixturevalue(folder))
    ids = [ref.encode(text) for text in TEXTS]
    for clean in (None, True, False):
        for row in ids:
            assert ours.decode(row, clean_up_tokenization_spaces=clean) == \
                ref.decode(row, clean_up_tokenization_spaces=clean), (clean, row)
        assert ours.batch_decode(ids, clean_up_tokenization_spaces=clean) == \
            ref.batch_decode(ids, clean_up_tokenization_spaces=clean)
    if folder == "wordpiece_dir":  # the clean-up did something there
        assert ours.decode(ref.encode("it ' s n't ?")) != ours.decode(ref.encode("it ' s n't ?"),
                                                                      clean_up_tokenization_spaces=False)


# ----- chat templates -------------------------------------------------------------------------


CHAT_CALLS = [
    (CHATS[0], {}),  # return_dict=True is 5.24's default
    (CHATS[0], dict(return_tensors="pt")),
    (CHATS[0], dict(return_dict=False)),
    (CHATS[0], dict(return_dict=False, return_tensors="pt")),
    (CHATS[0], dict(tokenize=False, enable_thinking=False, tools=[{"type": "function", "function": {"name": "f"}}],
                    documents=[{"title": "a", "text": "b"}], add_generation_prompt=True)),
    (CHATS[0], dict(tokenize=False, eos_token="<E>")),  # a keyword overrides a special token
    (CHATS, dict(tokenize=False)),
    (CHATS, {}),
    (CHATS, dict(return_dict=False)),
    (CHATS, dict(padding=True, return_tensors="pt")),
    (CHATS, dict(truncation=True, max_length=5)),
    (CHATS[0], dict(truncation=True, max_length=5, return_dict=False)),
    (CHATS[0], dict(max_length=5)),  # truncation is False by default here
    (CHATS[0], dict(padding="max_length", max_length=30)),
    (CHATS[1], dict(continue_final_message=True, tokenize=False)),
    (CHATS[1], dict(continue_final_message=True)),
    (CHATS[0], dict(tokenizer_kwargs={"return_length": True})),
]


@pytest.mark.parametrize("conversation,options", CHAT_CALLS)
def test_apply_chat_template_matches_transformers(trained_dir, conversation, options):
    ours, ref = both(trained_dir)
    assert ours.chat_template == ref.chat_template == TEMPLATE
    same(ours.apply_chat_template(conversation, **options), ref.apply_chat_template(conversation, **options))


def test_chat_template_options_pocketlm_lacks_or_refuses(trained_dir):
    ours = api.AutoTokenizer.from_pretrained(trained_dir)
    with pytest.raises(TokenizerError, match="return_assistant_tokens_mask"):
        ours.apply_chat_template(CHATS[1], return_assistant_tokens_mask=True)
    with pytest.raises(ConfigError, match="continue_final_message"):
        ours.apply_chat_template(CHATS[1], continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="final message"):
        ours.apply_chat_template(CHATS[1], continue_final_message=True, chat_template="{{ 'no messages' }}")


# ----- trained tokenizers can pad -------------------------------------------------------------


def test_trained_tokenizer_pads_without_changing_its_size(tmp_path):
    (tmp_path / "my_text.txt").write_text("".join(_corpus(300)))
    tok = Tokenizer.train([tmp_path / "my_text.txt"], vocab_size=300)  # docs/architecture.md's example
    batch = tok(["a", "longer text"], padding=True, return_tensors="pt")
    assert len(tok) == 300 and tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
    assert batch.input_ids[0, 1:].tolist() == [tok.pad_token_id] * (batch.input_ids.shape[1] - 1)
    assert batch.attention_mask.sum(1).tolist() == [1, batch.input_ids.shape[1]]
    tok.save_pretrained(tmp_path / "tok")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (ref.pad_token, ref.pad_token_id) == (PAD, tok.pad_token_id)
    same(tok(TEXTS, padding=True, return_tensors="pt"), ref(TEXTS, padding=True, return_tensors="pt"))
    # named tokens join the special tokens; pad_token=None trains without one
    other = Tokenizer.train_from_iterator(_corpus(300), 300, eos_token="</s>", pad_token=None)
    assert other.pad_token is None and other.all_special_tokens == ["</s>", EOT]


def test_a_tokenizer_json_with_its_own_padding_and_truncation_is_called_as_asked(gpt2_dir, tmp_path):
    backend = Backend.from_file(str(gpt2_dir / "tokenizer.json"))
    backend.enable_padding(length=40, pad_id=0, pad_token=EOT)
    backend.enable_truncation(3)
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text((gpt2_dir / "tokenizer_config.json").read_text())
    ours, ref = both(tmp_path)
    same(ours(TEXTS), ref(TEXTS))
    assert ours.backend.padding["length"] == 40  # the saved settings are left as they were


# ----- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda t: t("x", bogus=1),
    lambda t: t.encode("x", is_split_into_words=True),
    lambda t: t.decode([1], spaces_between_special_tokens=False),
    lambda t: t.pad({"input_ids": [[1]]}, verbose=False),
    lambda t: t.pad({"input_ids": [[1], [2]], "labels": 3}),
    lambda t: t("x", padding_side="up", padding=True),
    lambda t: t(["x", "y"], padding=True, pad_to_multiple_of=0),
    lambda t: t("x", truncation=True, max_length=-1),
    lambda t: t("x", max_length="5"),
    lambda t: t("x", truncation="sideways"),
    lambda t: t(["x", "y"], ["only one pair"]),
    lambda t: t("x", ["a list pair"]),
    lambda t: t([["x", 3]]),
    lambda t: t.tokenize(None),
    lambda t: t.convert_tokens_to_string("abc"),
    lambda t: t.add_special_tokens({"foo_token": "<f>"}),
    lambda t: t.add_special_tokens({"pad_token": 3}),
    lambda t: t.add_special_tokens({"additional_special_tokens": "<one>"}),
    lambda t: t.add_special_tokens(["<pad>"]),
    lambda t: t.add_tokens([3]),
    lambda t: t.add_tokens([""]),
    lambda t: t.decode(None),
    lambda t: setattr(t, "clean_up_tokenization_spaces", "yes"),
    lambda t: setattr(t, "model_input_names", "input_ids"),
    lambda t: t.apply_chat_template(CHATS[0], sanitize_control_tokens=True),
])
def test_bad_arguments_are_typed_errors(trained_dir, call):
    tok = api.AutoTokenizer.from_pretrained(trained_dir)
    with pytest.raises(PocketLMError) as caught:
        call(tok)
    assert isinstance(caught.value, (TokenizerError, ConfigError))
