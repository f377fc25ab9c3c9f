"""The text ↔ token-id boundary of pocketlm: a `Tokenizer` that wraps a `tokenizers.Tokenizer`
(the Rust library does the real work) and adds what the rest of the toolkit needs around it —
training byte-level BPE on local text, loading Hugging Face tokenizer folders (tokenizer.json with
tokenizer_config.json, or GPT-2's vocab.json + merges.txt), saving folders that `transformers`
loads back unchanged, named special tokens, and `transformers`-style calls (padding, truncation,
tensors) so that user code moves between the two libraries without surprises."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from pocketlm.errors import ConfigError, FormatError, NotFoundError, TokenizerError
from pocketlm.files import MAX_JSON_BYTES, atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

SPECIAL_ROLES = ("bos", "eos", "unk", "pad", "sep", "cls", "mask")
ENDOFTEXT = "<|endoftext|>"
# A token of its own rather than pad = eos: code that hides padding from the loss by its id
# (`labels[ids == pad_token_id] = -100`, as data collators do) must not hide the eos tokens the
# model has to learn to write, and "the last non-pad token" stays unambiguous for classification.
PAD = "<|pad|>"
DEFAULT_INPUT_NAMES = ("input_ids", "attention_mask")
# What padding writes into each per-token feature besides input_ids (which gets the pad id);
# features not listed here (labels, length) are the caller's and pass through unpadded.
PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1, "offset_mapping": (0, 0)}
# The spaces WordPiece decoding leaves before punctuation and contractions ("it ' s ,").
CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# every file a tokenizer folder may hold: writing a new tokenizer over an old one replaces them all
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", CHAT_TEMPLATE_FILE,
                   "vocab.json", "merges.txt")
# transformers writes int(1e30) to mean "no limit"; no real context window comes near this.
_NO_LIMIT_THRESHOLD = 10**9
MAX_TRAINED_VOCAB = 1_000_000


class BatchEncoding(dict):
    """`{"input_ids": ..., "attention_mask": ...}` with attribute access and `.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> BatchEncoding:
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


def _special_token_property(role: str) -> property:
    def get(self: Tokenizer) -> str | None:
        return self._special[role]

    def set_(self: Tokenizer, token: str | AddedToken | None) -> None:
        self._set_special(role, token)

    return property(get, set_, doc=f"The {role} token as a string, or None when there is none.")


def _special_id_property(role: str) -> property:
    def get(self: Tokenizer) -> int | None:
        token = self._special[role]
        return None if token is None else self._backend.token_to_id(token)

    def set_(self: Tokenizer, token_id: int | None) -> None:
        self._set_special(role, None if token_id is None else self._token_of_id(token_id, f"{role}_token_id"))

    return property(get, set_, doc=f"The id of the {role} token, or None when there is none.")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus named special tokens, length limit, padding side and chat template."""

    bos_token = _special_token_property("bos")
    eos_token = _special_token_property("eos")
    unk_token = _special_token_property("unk")
    pad_token = _special_token_property("pad")
    sep_token = _special_token_property("sep")
    cls_token = _special_token_property("cls")
    mask_token = _special_token_property("mask")
    bos_token_id = _special_id_property("bos")
    eos_token_id = _special_id_property("eos")
    unk_token_id = _special_id_property("unk")
    pad_token_id = _special_id_property("pad")
    sep_token_id = _special_id_property("sep")
    cls_token_id = _special_id_property("cls")
    mask_token_id = _special_id_property("mask")

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 sep_token: str | None = None, cls_token: str | None = None, mask_token: str | None = None,
                 model_max_length: int | None = None, chat_template: str | None = None,
                 padding_side: str = "right", clean_up_tokenization_spaces: bool = False,
                 model_input_names: Iterable[str] = DEFAULT_INPUT_NAMES):
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, not {type(backend).__name__}")
        self._backend = backend
        # Per-call options (split_special_tokens, truncation) are state on the shared backend; the
        # lock keeps one call's settings from leaking into a concurrent call from another thread.
        self._lock = threading.Lock()
        self._special: dict[str, str | None] = dict.fromkeys(SPECIAL_ROLES)
        tokens = dict(bos=bos_token, eos=eos_token, unk=unk_token, pad=pad_token, sep=sep_token,
                      cls=cls_token, mask=mask_token)
        for role, token in tokens.items():
            self._set_special(role, token)
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.model_input_names = model_input_names

    # ----- training -------------------------------------------------------------------------

    @classmethod
    def train(cls, files: str | os.PathLike | Iterable[str | os.PathLike], vocab_size: int, *,
              special_tokens: Iterable[str] = (ENDOFTEXT,), min_frequency: int = 2,
              bos_token: str | None = None, eos_token: str | None = ENDOFTEXT, pad_token: str | None = PAD,
              model_max_length: int | None = 1024, show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE tokenizer (GPT-2 style) on UTF-8 text files.

        `vocab_size` counts every token, special ones included. The bos/eos/pad tokens are special
        tokens (added to `special_tokens` when not listed there); the pad token `<|pad|>` lets
        batches be padded out of the box (pass `pad_token=None` for none)."""
        paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
        if not paths:
            raise ConfigError("Tokenizer.train needs at least one text file")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise NotFoundError(f"training text file(s) not found: {', '.join(missing)}")
        backend = _byte_level_bpe_backend()
        trainer = _bpe_trainer(vocab_size, special_tokens, min_frequency, show_progress,
                               (bos_token, eos_token, pad_token))
        try:
            backend.train([str(p) for p in paths], trainer)
        except Exception as e:  # the Rust side raises bare Exception, e.g. for non-UTF-8 files
            raise TokenizerError(f"training on {', '.join(map(str, paths))} failed: {e}") from None
        return cls(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                   model_max_length=model_max_length)

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int, *,
                            special_tokens: Iterable[str] = (ENDOFTEXT,), min_frequency: int = 2,
                            bos_token: str | None = None, eos_token: str | None = ENDOFTEXT,
                            pad_token: str | None = PAD, model_max_length: int | None = 1024,
                            show_progress: bool = False) -> Tokenizer:
        """Like `train`, but on an iterable of strings (documents) instead of files."""
        backend = _byte_level_bpe_backend()
        trainer = _bpe_trainer(vocab_size, special_tokens, min_frequency, show_progress,
                               (bos_token, eos_token, pad_token))
        try:
            backend.train_from_iterator(texts, trainer)
        except Exception as e:
            raise TokenizerError(f"training failed: {e}") from None
        return cls(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                   model_max_length=model_max_length)

    # ----- loading and saving ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a folder (tokenizer.json, or vocab.json + merges.txt) or a tokenizer.json file.

        Config files beside the tokenizer (tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja) supply special tokens, length limit, padding side and chat template.
        """
        path = Path(path)
        if path.is_file():
            folder, tokenizer_json = path.parent, path
        elif path.is_dir():
            folder, tokenizer_json = path, path / "tokenizer.json"
        else:
            raise NotFoundError(f"tokenizer path does not exist: {path}")

        if tokenizer_json.is_file():
            backend = _load_tokenizer_json(tokenizer_json)
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            backend = _load_vocab_and_merges(folder / "vocab.json", folder / "merges.txt")
        else:
            raise NotFoundError(
                f"no tokenizer files in {folder}: expected tokenizer.json, "
                "or vocab.json together with merges.txt (GPT-2 style)"
            )
        settings = _read_settings(folder)
        tokens = {role: settings.pop(f"{role}_token") for role in SPECIAL_ROLES}
        if not any(tokens.values()) and backend.token_to_id(ENDOFTEXT) is not None:
            # No config names any special token: follow GPT-2, whose files carry none either.
            tokens.update(bos=ENDOFTEXT, eos=ENDOFTEXT, unk=ENDOFTEXT)
        for role, token in tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                log.warning("%s: %s_token %r is not in the vocabulary; ignoring it", folder, role, token)
                tokens[role] = None
        try:
            return cls(backend, **{f"{role}_token": token for role, token in tokens.items()}, **settings)
        except ConfigError as e:
            raise TokenizerError(f"bad setting in the tokenizer config of {folder}: {e}") from None

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
        folder = Path(folder)
        tokens = {f"{role}_token": token for role, token in self._special.items() if token is not None}
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **tokens,
            "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
        if self.model_input_names != list(DEFAULT_INPUT_NAMES):
            config["model_input_names"] = self.model_input_names
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(folder / "tokenizer.json", self._backend.to_str(pretty=True))
        atomic_write_json(folder / "tokenizer_config.json", config)
        atomic_write_json(folder / "special_tokens_map.json", tokens)
        # transformers (and our loader) let chat_template.jinja override the config, so a file
        # left over from an earlier save would silently win over the template just written.
        template_file = folder / CHAT_TEMPLATE_FILE
        if self.chat_template is not None and template_file.exists():
            atomic_write_text(template_file, self.chat_template)
        elif self.chat_template is None:
            template_file.unlink(missing_ok=True)

    # ----- encoding -------------------------------------------------------------------------

    def __call__(self, text: str | list[str] | list[list[str]], text_pair: str | list[str] | None = None, *,
                 add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 return_token_type_ids: bool | None = None, return_special_tokens_mask: bool = False,
                 return_offsets_mapping: bool = False, return_length: bool = False,
                 split_special_tokens: bool = False, **unknown: Any) -> BatchEncoding:
        """Tokenize one string, a batch, or text pairs, with the semantics of `transformers` tokenizers:
        `tok(text)`, `tok(texts, padding=True, return_tensors="pt")`, `tok(question, context)`,
        `tok([[question, context], ...])`. As there, `max_length` alone (no padding) truncates, and
        `length` is each row's length after padding."""
        _refuse_unknown(unknown, "the tokenizer call", Tokenizer.__call__)
        batched, texts, pairs = _text_inputs(text, text_pair)
        truncate = self._truncation(truncation, max_length, padding)
        width = self._padding_width(padding, max_length, pad_to_multiple_of)
        if truncate and width and pad_to_multiple_of and max_length is not None and max_length % pad_to_multiple_of:
            raise TokenizerError(f"max_length={max_length} truncates to a length that is not a multiple of "
                                 f"pad_to_multiple_of={pad_to_multiple_of}; make it one")
        encodings = self._encode(texts, pairs, add_special_tokens, split_special_tokens, truncate)
        features: dict[str, list] = {"input_ids": [e.ids for e in encodings]}
        if self._returns("token_type_ids", return_token_type_ids):
            features["token_type_ids"] = [e.type_ids for e in encodings]
        if self._returns("attention_mask", return_attention_mask):
            features["attention_mask"] = [e.attention_mask for e in encodings]
        if return_special_tokens_mask:
            features["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        if return_offsets_mapping:
            features["offset_mapping"] = [e.offsets for e in encodings]
        if width is not None:
            features = self._pad_features(features, width(features["input_ids"]), padding_side)
        if return_length:
            features["length"] = [len(row) for row in features["input_ids"]]
        return _batch_encoding(features, batched, return_tensors)

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True, *,
               truncation: bool | str | None = None, max_length: int | None = None,
               padding: bool | str = False, pad_to_multiple_of: int | None = None,
               padding_side: str | None = None, return_tensors: str | None = None,
               split_special_tokens: bool = False, **unknown: Any) -> Any:
        """Token ids of one string (or pair): a list of ints, or a [1, T] tensor with `return_tensors`."""
        _refuse_unknown(unknown, "encode", Tokenizer.encode)
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes one string, not {type(text).__name__}; "
                                 "call the tokenizer itself for batches")
        return self(text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                    max_length=max_length, padding=padding, pad_to_multiple_of=pad_to_multiple_of,
                    padding_side=padding_side, return_tensors=return_tensors,
                    split_special_tokens=split_special_tokens, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False,
                 split_special_tokens: bool = False, **unknown: Any) -> list[str]:
        """The token strings of `text` (byte-level BPE shows a leading space as 'Ġ'); as in
        transformers, special tokens the post-processor would add are left out unless asked for."""
        _refuse_unknown(unknown, "tokenize", Tokenizer.tokenize)
        if not isinstance(text, str) or not (pair is None or isinstance(pair, str)):
            raise TokenizerError(f"tokenize takes one string (and optionally a pair string), not {text!r:.80}")
        encoding, = self._encode([text], None if pair is None else [pair], add_special_tokens,
                                 split_special_tokens, None)
        return encoding.tokens

    def pad(self, encoded_inputs: Any, padding: bool | str = True, max_length: int | None = None,
            pad_to_multiple_of: int | None = None, padding_side: str | None = None,
            return_attention_mask: bool | None = None, return_tensors: str | None = None,
            **unknown: Any) -> BatchEncoding:
        """Pad encodings made earlier, as a data collator does: `encoded_inputs` is one encoding
        (a dict of lists or tensors) or a list of them (one per example). input_ids, attention_mask,
        token_type_ids, special_tokens_mask and offset_mapping are padded; other keys (labels)
        pass through as they are."""
        _refuse_unknown(unknown, "pad", Tokenizer.pad)
        batched, features = _collate(encoded_inputs)
        if "attention_mask" not in features and self._returns("attention_mask", return_attention_mask):
            features["attention_mask"] = [[1] * len(row) for row in features["input_ids"]]
        width = self._padding_width(padding, max_length, pad_to_multiple_of)
        if width is not None:
            features = self._pad_features(features, width(features["input_ids"]), padding_side)
        out = _batch_encoding(features, batched, return_tensors)
        if return_tensors is not None and not batched:  # one encoding in: one 1-D tensor per key out
            out = BatchEncoding({key: value[0] for key, value in out.items()})
        return out

    def _returns(self, name: str, requested: bool | None) -> bool:
        """Whether an optional feature goes into the output: as asked, else as the tokenizer's
        model_input_names say (transformers' rule)."""
        return bool(requested) if requested is not None else name in self.model_input_names

    def _encode(self, texts: list[str], pairs: list[str] | None, add_special_tokens: bool,
                split_special_tokens: bool, truncate: tuple[int, str] | None) -> list[tokenizers.Encoding]:
        if truncate is not None:
            reserved = self._backend.num_special_tokens_to_add(pairs is not None) if add_special_tokens else 0
            if truncate[0] < reserved:
                raise TokenizerError(f"max_length={truncate[0]} leaves no room for the {reserved} special tokens")
        inputs = texts if pairs is None else list(zip(texts, pairs))
        with self._lock, _call_options(self._backend, split_special_tokens, truncate):
            try:
                return self._backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
            except Exception as e:  # the Rust side raises bare Exception, e.g. a pair too short to truncate
                raise TokenizerError(f"cannot tokenize this input: {e}") from None

    def _truncation(self, truncation: bool | str | None, max_length: int | None,
                    padding: bool | str) -> tuple[int, str] | None:
        """(length, strategy) to truncate to, or None. Truncation keeps the special tokens the
        post-processor adds (BOS/EOS) and cuts the text, as transformers does."""
        if truncation is None:  # transformers' rule: a max_length without padding means truncate
            truncation = max_length is not None and padding in (False, "do_not_pad")
        if truncation in (False, "do_not_truncate"):
            return None
        strategy = "longest_first" if truncation is True else truncation
        if strategy not in ("longest_first", "only_first", "only_second"):
            raise TokenizerError(f"truncation must be True, False, 'longest_first', 'only_first' or "
                                 f"'only_second', not {truncation!r}")
        limit = max_length if max_length is not None else self.model_max_length
        if limit is None:
            return None  # no known limit, so nothing to truncate to
        return _count(limit, "max_length", smallest=0), strategy

    def _padding_width(self, padding: bool | str, max_length: int | None, pad_to_multiple_of: int | None):
        """None for no padding, else a function of the rows giving the width to pad them to."""
        if padding in (False, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            target = None
        elif padding == "max_length":
            target = max_length if max_length is not None else self.model_max_length
            if target is None:
                raise TokenizerError("padding='max_length' needs max_length: no model_max_length is known")
            target = _count(target, "max_length", smallest=0)
        else:
            raise TokenizerError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}")
        multiple = None if pad_to_multiple_of is None else _count(pad_to_multiple_of, "pad_to_multiple_of")
        if self.pad_token_id is None:
            raise TokenizerError(
                "padding needs a pad token and this tokenizer has none; for decoder-only models set "
                "`tokenizer.pad_token = tokenizer.eos_token` (the attention mask hides the padding), or add "
                "one with `tokenizer.add_special_tokens({'pad_token': '<|pad|>'})` and resize the model's embeddings"
            )

        def width(rows: list[list[int]]) -> int:
            longest = max((len(row) for row in rows), default=0) if target is None else target
            return longest if multiple is None else -(-longest // multiple) * multiple

        return width

    def _pad_features(self, features: dict[str, list], width: int, side: str | None) -> dict[str, list]:
        side = self.padding_side if side is None else side
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', not {side!r}")
        fills = {"input_ids": self.pad_token_id, **PAD_VALUES}
        padded = {}
        for key, rows in features.items():
            if key not in fills:  # labels, lengths: the caller's business
                padded[key] = rows
                continue
            padded[key] = []
            for row in rows:
                fill = [fills[key]] * max(width - len(row), 0)  # longer rows stay as they are
                padded[key].append(fill + list(row) if side == "left" else list(row) + fill)
        return padded

    # ----- decoding -------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **unknown: Any) -> str:
        """Text of a sequence of ids (list, 1-D or [1, T] tensor, numpy array), exactly as encoded."""
        _refuse_unknown(unknown, "decode", Tokenizer.decode)
        try:
            ids = ids.tolist() if hasattr(ids, "tolist") else ids
            ids = [ids] if isinstance(ids, int) else list(ids)
            if len(ids) == 1 and isinstance(ids[0], list):  # a [1, T] batch of one
                ids = ids[0]
            text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:
            raise TokenizerError(f"decode needs a flat sequence of non-negative int ids: {e}") from None
        return self._clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **unknown: Any) -> list[str]:
        """Decode each row of a batch (list of lists, 2-D tensor or array)."""
        _refuse_unknown(unknown, "batch_decode", Tokenizer.batch_decode)
        try:
            rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
            rows = [row.tolist() if hasattr(row, "tolist") else list(row) for row in rows]
            texts = self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:
            raise TokenizerError(f"batch_decode needs sequences of non-negative int ids: {e}") from None
        return [self._clean_up(text, clean_up_tokenization_spaces) for text in texts]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Token strings (as `tokenize` gives them) back to text, through the tokenizer's decoder."""
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(f"convert_tokens_to_string takes a list of token strings, not {tokens!r:.80}")
        decoder = self._backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def _clean_up(self, text: str, requested: bool | None) -> str:
        wanted = self.clean_up_tokenization_spaces if requested is None else requested
        # BPE decoding restores spaces exactly, and the cleanup (made for WordPiece) would delete
        # real ones ("a , b" → "a, b"): transformers skips it for BPE models too.
        if not wanted or isinstance(self._backend.model, models.BPE):
            return text
        for before, after in CLEANUP_REPLACEMENTS:
            text = text.replace(before, after)
        return text

    # ----- vocabulary -----------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as in transformers)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Ids of tokens; a token not in the vocabulary maps to the unk id (None without one)."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens first, then every other token the backend treats as special."""
        named = [token for token in self._special.values() if token is not None]
        added = self._backend.get_added_tokens_decoder()
        others = [added[i].content for i in sorted(added) if added[i].special]
        return list(dict.fromkeys(named + others))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._backend.token_to_id(token) for token in self.all_special_tokens]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """`{"eos_token": "<|endoftext|>", ...}` for each named special token that is set."""
        return {f"{role}_token": token for role, token in self._special.items() if token is not None}

    def add_tokens(self, new_tokens: str | AddedToken | list[str | AddedToken], special_tokens: bool = False) -> int:
        """Add tokens, kept whole wherever they appear in text, after the existing ids. Returns how
        many ids are new, the rows `model.resize_token_embeddings(len(tokenizer))` adds; a token
        the vocabulary already has gets no new id."""
        tokens = [new_tokens] if isinstance(new_tokens, (str, AddedToken)) else new_tokens
        if not isinstance(tokens, (list, tuple)) or \
                not all(isinstance(t, (str, AddedToken)) and _token_content(t, "token") for t in tokens):
            raise TokenizerError(f"add_tokens takes a token string or a list of them, e.g. "
                                 f"add_tokens(['<tool>', '</tool>']), not {new_tokens!r:.80}")
        before = len(self)
        added = [t if isinstance(t, AddedToken) else
                 AddedToken(t, special=special_tokens, normalized=not special_tokens) for t in tokens]
        if special_tokens:
            self._backend.add_special_tokens(added)
        else:
            self._backend.add_tokens(added)
        return len(self) - before

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any]) -> int:
        """Name special tokens, adding those the vocabulary lacks, as transformers does:
        `add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<tool>"]})`.
        Returns how many ids are new (resize the model's embeddings to `len(tokenizer)` then)."""
        if not isinstance(special_tokens_dict, Mapping):
            raise TokenizerError(f"add_special_tokens takes a dict such as {{'pad_token': '<pad>'}}, "
                                 f"not {special_tokens_dict!r:.80}")
        extra_keys = ("additional_special_tokens", "extra_special_tokens")
        named, extra = {}, []
        for key, value in special_tokens_dict.items():  # check everything before changing anything
            if key in extra_keys:
                if not isinstance(value, (list, tuple)) or not all(_token_content(t, key) for t in value):
                    raise TokenizerError(f"{key} must be a list of token strings, not {value!r:.80}")
                extra += [_as_added_token(t) for t in value]
            elif isinstance(key, str) and key.endswith("_token") and key[:-6] in SPECIAL_ROLES:
                if not _token_content(value, key):
                    raise TokenizerError(f"{key} must be a token string, not {value!r:.80}")
                named[key[:-6]] = _as_added_token(value)
            else:
                roles = ", ".join(f"{role}_token" for role in SPECIAL_ROLES)
                raise TokenizerError(f"add_special_tokens got {key!r}; the keys are {roles} and "
                                     "additional_special_tokens")
        before = len(self)
        # a token the vocabulary already has keeps its entry and flags, and is only marked special
        self.add_tokens([t for t in [*named.values(), *extra] if self._backend.token_to_id(t.content) is None],
                        special_tokens=True)
        for token in extra:
            self._mark_special(token.content)
        for role, token in named.items():
            self._set_special(role, token)
        return len(self) - before

    def _token_of_id(self, token_id: Any, what: str) -> str:
        token = None
        if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0:
            token = self._backend.id_to_token(token_id)
        if token is None:
            raise TokenizerError(f"{what}={token_id!r} is not an id of this vocabulary (0 to {len(self) - 1})")
        return token

    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json: token shards record it to catch a tokenizer swap."""
        canonical = json.dumps(json.loads(self._backend.to_str()), sort_keys=True,
                               ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ----- settings -------------------------------------------------------------------------

    @property
    def model_max_length(self) -> int | None:
        return self._model_max_length

    @model_max_length.setter
    def model_max_length(self, value: int | float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"model_max_length must be a positive integer or None, not {value!r}")
        if value is not None and value >= _NO_LIMIT_THRESHOLD:
            value = None
        if value is not None and (not value > 0 or value != int(value)):  # `not >` also rejects NaN
            raise ConfigError(f"model_max_length must be a positive integer or None, not {value!r}")
        self._model_max_length = None if value is None else int(value)

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', not {side!r}")
        self._padding_side = side

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        """decode's default for removing spaces before punctuation; byte-level BPE never needs it."""
        return self._clean_up_tokenization_spaces

    @clean_up_tokenization_spaces.setter
    def clean_up_tokenization_spaces(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"clean_up_tokenization_spaces must be True or False, not {value!r}")
        self._clean_up_tokenization_spaces = value

    @property
    def model_input_names(self) -> list[str]:
        """The features a call returns by default (token_type_ids only when named here)."""
        return list(self._model_input_names)

    @model_input_names.setter
    def model_input_names(self, names: Iterable[str]) -> None:
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or \
                not all(isinstance(n, str) for n in names) or "input_ids" not in names:
            raise ConfigError(f"model_input_names must be a list of feature names including 'input_ids', "
                              f"such as {list(DEFAULT_INPUT_NAMES)}, not {names!r:.80}")
        self._model_input_names = tuple(names)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is not None and not isinstance(template, str):
            raise ConfigError(f"chat_template must be a string or None, not {type(template).__name__}")
        self._chat_template = template

    def apply_chat_template(self, conversation: list[dict[str, Any]] | list[list[dict[str, Any]]], *,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            chat_template: str | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True,
                            padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                            return_tensors: str | None = None, return_dict: bool = True,
                            tokenizer_kwargs: dict[str, Any] | None = None, **variables: Any) -> Any:
        """Messages (or a list of conversations) → prompt text, or its tokens, as transformers does.

        The template (this tokenizer's, or `chat_template`) renders in a jinja2 sandbox with the
        special tokens, `tools`, `documents` and every other keyword (`enable_thinking=False`, ...)
        defined as variables. tokenize=False gives the text; otherwise the tokenizer's output
        (input_ids + attention_mask; `return_dict=False` for the ids alone), with no special tokens
        beyond those the template wrote, padded/truncated as asked."""
        from pocketlm.chat import render_chat

        for option in ("return_assistant_tokens_mask", "sanitize_control_tokens"):
            if variables.pop(option, False):
                raise TokenizerError(f"apply_chat_template does not support {option}=True in pocketlm")
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise TokenizerError("this tokenizer has no chat template; pass chat_template=... or format "
                                 "the conversation yourself")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            all(isinstance(c, (list, tuple)) for c in conversation)
        texts = [render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                             continue_final_message=continue_final_message,
                             **{**self.special_tokens_map, "tools": tools, "documents": documents, **variables})
                 for messages in (conversation if batched else [conversation])]
        if not tokenize:
            return texts if batched else texts[0]
        if not isinstance(tokenizer_kwargs or {}, dict):
            raise TokenizerError(f"tokenizer_kwargs must be a dict of tokenizer call options, "
                                 f"not {tokenizer_kwargs!r:.80}")
        options = dict(add_special_tokens=False, padding=padding, truncation=truncation, max_length=max_length,
                       return_tensors=return_tensors)
        out = self(texts if batched else texts[0], **{**options, **(tokenizer_kwargs or {})})
        return out if return_dict else out["input_ids"]

    def _set_special(self, role: str, token: str | AddedToken | dict | None) -> None:
        token = _token_content(token, f"{role}_token")
        if token is not None:
            token_id = self._backend.token_to_id(token)
            if token_id is None:
                raise TokenizerError(
                    f"{role}_token {token!r} is not in the vocabulary; use one of its tokens (a common "
                    "choice is `tokenizer.pad_token = tokenizer.eos_token`), or add it with "
                    f"`tokenizer.add_special_tokens({{'{role}_token': {token!r}}})` and resize the model's embeddings"
                )
            self._mark_special(token)
        self._special[role] = token

    def _mark_special(self, token: str) -> None:
        added = self._backend.get_added_tokens_decoder().get(self._backend.token_to_id(token))
        if added is None or not added.special:
            # Registering it as special makes the backend keep it whole when it appears in
            # text and drop it on skip_special_tokens, as transformers does.
            self._backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers receive the tokenizer by pickle, and a lock cannot be pickled.
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __repr__(self) -> str:
        named = ", ".join(f"{role}={token!r}" for role, token in self._special.items() if token is not None)
        return f"Tokenizer(vocab={len(self)}, {named}, model_max_length={self.model_max_length})"


def _byte_level_bpe_backend() -> tokenizers.Tokenizer:
    """An empty GPT-2 style pipeline: bytes shown as printable symbols, split by GPT-2's regex."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _bpe_trainer(vocab_size, special_tokens, min_frequency, show_progress,
                 named_tokens) -> trainers.BpeTrainer:
    # the bos/eos/pad tokens are special tokens too: those the list leaves out join its end
    special_tokens = list(dict.fromkeys([*special_tokens, *(t for t in named_tokens if t is not None)]))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ConfigError(
            f"vocab_size={vocab_size!r} is too small: byte-level BPE needs at least {smallest} "
            f"({len(alphabet)} byte symbols + {len(special_tokens)} special tokens)"
        )
    if vocab_size > MAX_TRAINED_VOCAB:  # the trainer would try to allocate for it, and abort the process
        raise ConfigError(f"a vocabulary of {vocab_size:,} tokens is too large to train: at most "
                          f"{MAX_TRAINED_VOCAB:,} (the largest published tokenizers have about 260,000)")
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        # Seeding all 256 byte symbols means every string stays encodable whatever the corpus held.
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise TokenizerError(f"{path} is larger than any real tokenizer.json; is it the right file?")
    try:
        return tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises bare Exception for every parse failure
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from None


def _load_vocab_and_merges(vocab_path: Path, merges_path: Path) -> tokenizers.Tokenizer:
    """GPT-2's two-file format, assembled the way transformers' GPT2 tokenizer does it."""
    try:
        vocab = read_json(vocab_path, "vocab.json")
    except FormatError as e:
        raise TokenizerError(str(e)) from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_path} must map token strings to integer ids")
    try:
        model = models.BPE.from_file(str(vocab_path), str(merges_path))
    except Exception as e:  # the vocabulary parsed above, so the merges are what is broken
        raise TokenizerError(f"{merges_path} is not a valid merges file for {vocab_path.name}: {e}") from None
    backend = _byte_level_bpe_backend()
    backend.model = model
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _read_settings(folder: Path) -> dict[str, Any]:
    """Special tokens and Tokenizer settings from the config files of a folder (all optional)."""
    config = _read_optional_json(folder / "tokenizer_config.json")
    # Legacy file: it only fills in what tokenizer_config.json leaves out.
    special_map = _read_optional_json(folder / "special_tokens_map.json")
    settings: dict[str, Any] = {}
    for role in SPECIAL_ROLES:
        key = f"{role}_token"
        value = config.get(key) if config.get(key) is not None else special_map.get(key)
        settings[key] = _token_content(value, f"{key} in {folder}")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    template_file = folder / CHAT_TEMPLATE_FILE
    if template_file.is_file():  # newer transformers save the template here, and it wins there too
        try:
            template = template_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{template_file} is not UTF-8 text: {e}") from None
    settings["chat_template"] = template
    settings["model_max_length"] = config.get("model_max_length")
    settings["padding_side"] = config.get("padding_side", "right")
    settings["clean_up_tokenization_spaces"] = config.get("clean_up_tokenization_spaces", False)
    settings["model_input_names"] = config.get("model_input_names", DEFAULT_INPUT_NAMES)
    return settings


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = read_json(path, path.name)
    except FormatError as e:
        raise TokenizerError(str(e)) from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _as_added_token(token: str | AddedToken | dict) -> AddedToken:
    """A special token to add, as given (AddedToken keeps its flags) or as transformers makes one."""
    if isinstance(token, AddedToken):
        return token
    return AddedToken(_token_content(token, "token"), special=True, normalized=False)


def _token_content(token: str | AddedToken | dict | None, where: str) -> str | None:
    """A special token as configs write it (string, AddedToken, or {"content": ...}) → string."""
    if isinstance(token, AddedToken):
        return token.content
    if isinstance(token, dict):
        token = token.get("content")
    if token is None or isinstance(token, str):
        return token
    raise TokenizerError(f"{where} must be a token string, not {token!r}")


def _as_tensor(rows: list, kind: str, key: str = "input_ids") -> Any:
    if kind not in ("pt", "np"):
        raise TokenizerError(f"return_tensors must be 'pt', 'np' or None, not {kind!r}")
    if key == "length":  # a number per row
        array = np.array(rows, dtype=np.int64)
    else:
        lengths = {len(row) for row in rows}
        if len(lengths) > 1:
            raise TokenizerError(
                f"cannot make a tensor of {key} with lengths {sorted(lengths)}; "
                "pass padding=True (and truncation=True for a fixed limit)"
            )
        array = np.array(rows, dtype=np.int64)
        if array.ndim == 1:  # no rows, or only empty ones
            array = array.reshape(len(rows), 0)
    if kind == "np":
        return array
    import torch  # deferred: tokenizing for data preparation should not pay for importing torch

    return torch.from_numpy(array)


def _batch_encoding(features: dict[str, list], batched: bool, return_tensors: str | None) -> BatchEncoding:
    """Per-row lists → what the caller asked for: tensors (always with a batch axis), a batch of
    lists, or the lists of the one sequence (`length` stays a list, as in transformers)."""
    if return_tensors is not None:
        return BatchEncoding({key: _as_tensor(rows, return_tensors, key) for key, rows in features.items()})
    if not batched:
        return BatchEncoding({key: rows if key == "length" else rows[0] for key, rows in features.items()})
    return BatchEncoding(features)


def _text_inputs(text: Any, text_pair: Any) -> tuple[bool, list[str], list[str] | None]:
    """(batched, texts, pairs or None) from the ways transformers takes text: one string, a list
    of strings, a string and its pair, two lists, or a list of [text, pair] pairs."""
    if isinstance(text, str):
        if text_pair is not None and not isinstance(text_pair, str):
            raise TokenizerError(f"with one text, text_pair must be one string, not {text_pair!r:.80}")
        return False, [text], None if text_pair is None else [text_pair]
    if not isinstance(text, (list, tuple)):
        raise TokenizerError(f"the tokenizer takes a string, a list of strings or a list of [text, pair] "
                             f"pairs, not {text!r:.80}")
    texts, pairs = list(text), None
    if text_pair is not None:
        if not isinstance(text_pair, (list, tuple)) or len(text_pair) != len(texts):
            raise TokenizerError(f"text_pair must be a list with one string for each of the {len(texts)} texts")
        pairs = list(text_pair)
    elif texts and all(isinstance(t, (list, tuple)) and len(t) == 2 for t in texts):
        texts, pairs = [t[0] for t in texts], [t[1] for t in texts]
    if not all(isinstance(t, str) for t in texts + (pairs or [])):
        raise TokenizerError(f"the tokenizer takes a string, a list of strings or a list of [text, pair] "
                             f"pairs, not {text!r:.80}")
    return True, texts, pairs


def _collate(encoded: Any) -> tuple[bool, dict[str, list]]:
    """pad()'s input as (batched, {key: one row per sequence}), from one encoding (a dict of lists
    or tensors) or a list of encodings (the examples a data collator receives)."""
    def plain(value):
        return value.tolist() if hasattr(value, "tolist") else value

    if isinstance(encoded, (list, tuple)) and encoded and all(isinstance(e, Mapping) for e in encoded):
        keys = list(encoded[0])
        if any(list(e) != keys for e in encoded):
            raise TokenizerError(f"every encoding given to pad needs the same keys; the first has {keys}")
        batched, features = True, {key: [plain(e[key]) for e in encoded] for key in keys}
    elif isinstance(encoded, Mapping):
        features = {key: plain(value) for key, value in encoded.items()}
        ids = features.get("input_ids")
        batched = isinstance(ids, list) and any(not isinstance(row, int) for row in ids)
        if batched:
            if not all(isinstance(rows, list) and len(rows) == len(ids) for rows in features.values()):
                raise TokenizerError(f"pad needs one row per sequence under every key; got {encoded!r:.120}")
            features = {key: [plain(row) for row in rows] for key, rows in features.items()}
        else:
            features = {key: [value] for key, value in features.items()}
    else:
        raise TokenizerError("pad takes an encoding (a dict such as {'input_ids': [[...], ...]}) or a non-empty "
                             f"list of encodings, not {encoded!r:.80}")
    rows = features.get("input_ids")
    if not isinstance(rows, list) or not all(isinstance(row, list) and
                                             all(isinstance(i, int) and not isinstance(i, bool) for i in row)
                                             for row in rows):
        raise TokenizerError(f"pad needs 'input_ids' holding sequences of int ids; got keys {sorted(features)}")
    return batched, features


@contextlib.contextmanager
def _call_options(backend: tokenizers.Tokenizer, split_special_tokens: bool, truncate: tuple[int, str] | None):
    """One call's options on the shared backend (the caller holds the lock), restored after it.
    Padding and truncation saved inside a tokenizer.json never apply: the call's arguments decide."""
    saved = backend.encode_special_tokens, backend.truncation, backend.padding
    backend.encode_special_tokens = split_special_tokens
    backend.no_padding()
    if truncate is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(truncate[0], strategy=truncate[1])
    try:
        yield
    finally:
        backend.encode_special_tokens = saved[0]
        if saved[1] is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**saved[1])
        if saved[2] is not None:
            backend.enable_padding(**saved[2])


def _count(value: Any, name: str, smallest: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        raise TokenizerError(f"{name} must be an integer ≥ {smallest}, not {value!r}")
    return value


def _refuse_unknown(keywords: dict[str, Any], where: str, function: Any) -> None:
    """transformers warns about keywords it does not know and goes on; a typo here fails loudly."""
    if keywords:
        params = inspect.signature(function).parameters.values()
        known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][2:]  # after self, input
        raise TokenizerError(f"{where} got unknown keyword(s) {', '.join(sorted(keywords))}; "
                             f"it takes {', '.join(known)}")
