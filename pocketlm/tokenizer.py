"""The text ↔ token-id boundary of pocketlm: a `Tokenizer` that wraps a `tokenizers.Tokenizer`
(the Rust library does the real work) and adds what the rest of the toolkit needs around it —
training byte-level BPE on local text, loading Hugging Face tokenizer folders (tokenizer.json with
tokenizer_config.json, or GPT-2's vocab.json + merges.txt), saving folders that `transformers`
loads back unchanged, named special tokens, and `transformers`-style calls (padding, truncation,
tensors) so that user code moves between the two libraries without surprises."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from pocketlm.errors import ConfigError, FormatError, NotFoundError, TokenizerError
from pocketlm.files import MAX_JSON_BYTES, atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

SPECIAL_ROLES = ("bos", "eos", "unk", "pad")
ENDOFTEXT = "<|endoftext|>"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# transformers writes int(1e30) to mean "no limit"; no real context window comes near this.
_NO_LIMIT_THRESHOLD = 10**9


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

    return property(get, doc=f"The id of the {role} token, or None when there is none.")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus named special tokens, length limit, padding side and chat template."""

    bos_token = _special_token_property("bos")
    eos_token = _special_token_property("eos")
    unk_token = _special_token_property("unk")
    pad_token = _special_token_property("pad")
    bos_token_id = _special_id_property("bos")
    eos_token_id = _special_id_property("eos")
    unk_token_id = _special_id_property("unk")
    pad_token_id = _special_id_property("pad")

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 model_max_length: int | None = None, chat_template: str | None = None,
                 padding_side: str = "right"):
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, not {type(backend).__name__}")
        self._backend = backend
        # `encode_special_tokens` is state on the shared backend; the lock keeps one call's
        # split_special_tokens setting from leaking into a concurrent call from another thread.
        self._lock = threading.Lock()
        self._special: dict[str, str | None] = dict.fromkeys(SPECIAL_ROLES)
        for role, token in zip(SPECIAL_ROLES, (bos_token, eos_token, unk_token, pad_token)):
            self._set_special(role, token)
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self.padding_side = padding_side

    # ----- training -------------------------------------------------------------------------

    @classmethod
    def train(cls, files: str | os.PathLike | Iterable[str | os.PathLike], vocab_size: int, *,
              special_tokens: Iterable[str] = (ENDOFTEXT,), min_frequency: int = 2,
              bos_token: str | None = None, eos_token: str | None = ENDOFTEXT, pad_token: str | None = None,
              model_max_length: int | None = 1024, show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE tokenizer (GPT-2 style) on UTF-8 text files."""
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
                            pad_token: str | None = None, model_max_length: int | None = 1024,
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
            "clean_up_tokenization_spaces": False,
        }
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

    def __call__(self, text: str | list[str], *, padding: bool | str = False, truncation: bool | str = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 add_special_tokens: bool = True, return_attention_mask: bool = True,
                 split_special_tokens: bool = False) -> BatchEncoding:
        """Tokenize one string or a batch, with the semantics of `transformers` tokenizers."""
        batched = not isinstance(text, str)
        texts = list(text) if isinstance(text, (list, tuple)) else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TokenizerError(f"the tokenizer takes a string or a list of strings, not {text!r:.80}")
        limit = self._truncation_length(truncation, max_length)
        ids = self._encode_batch(texts, add_special_tokens, split_special_tokens, limit)
        width = self._padding_length(padding, max_length, ids)
        if width is None:
            mask = [[1] * len(row) for row in ids]
        else:
            ids, mask = self._pad(ids, width)

        out = {"input_ids": ids}
        if return_attention_mask:
            out["attention_mask"] = mask
        if return_tensors is not None:
            out = {key: _as_tensor(rows, return_tensors) for key, rows in out.items()}
        elif not batched:
            out = {key: rows[0] for key, rows in out.items()}
        return BatchEncoding(out)

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None,
               truncation: bool | str = False, max_length: int | None = None,
               split_special_tokens: bool = False) -> Any:
        """Token ids of one string: a list of ints, or a [1, T] tensor with `return_tensors`."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes one string, not {type(text).__name__}; "
                                 "call the tokenizer itself for batches")
        return self(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors,
                    truncation=truncation, max_length=max_length,
                    split_special_tokens=split_special_tokens, return_attention_mask=False)["input_ids"]

    def _encode_batch(self, texts: list[str], add_special_tokens: bool, split_special_tokens: bool,
                      max_length: int | None) -> list[list[int]]:
        with self._lock:
            previous = self._backend.encode_special_tokens
            self._backend.encode_special_tokens = split_special_tokens
            try:
                if max_length is None:
                    encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
                else:
                    raw = self._backend.encode_batch(texts, add_special_tokens=False)
                    encodings = [self._truncate(e, max_length, add_special_tokens) for e in raw]
            finally:
                self._backend.encode_special_tokens = previous
        return [e.ids for e in encodings]

    def _truncate(self, encoding: tokenizers.Encoding, max_length: int, add_special_tokens: bool):
        # Truncate the text part first so that BOS/EOS added by the post-processor survive,
        # which is what transformers does.
        reserved = self._backend.num_special_tokens_to_add(False) if add_special_tokens else 0
        if max_length < reserved:
            raise TokenizerError(f"max_length={max_length} leaves no room for the {reserved} special tokens")
        encoding.truncate(max_length - reserved)
        return self._backend.post_process(encoding, None, add_special_tokens)

    def _truncation_length(self, truncation: bool | str, max_length: int | None) -> int | None:
        if truncation in (False, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first", "only_first"):
            raise TokenizerError(f"truncation must be True, False or 'longest_first', not {truncation!r}")
        limit = max_length if max_length is not None else self.model_max_length
        if limit is not None and limit < 0:
            raise TokenizerError(f"max_length must not be negative, got {limit}")
        return limit  # None: no known limit, so nothing to truncate to

    def _padding_length(self, padding: bool | str, max_length: int | None,
                        ids: list[list[int]]) -> int | None:
        if padding in (False, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            width = max((len(row) for row in ids), default=0)
        elif padding == "max_length":
            width = max_length if max_length is not None else self.model_max_length
            if width is None:
                raise TokenizerError("padding='max_length' needs max_length: no model_max_length is known")
        else:
            raise TokenizerError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}")
        if self.pad_token_id is None:
            raise TokenizerError(
                "padding needs a pad token and this tokenizer has none; for decoder-only models set "
                "`tokenizer.pad_token = tokenizer.eos_token` (the attention mask hides the padding)"
            )
        return width

    def _pad(self, ids: list[list[int]], width: int) -> tuple[list[list[int]], list[list[int]]]:
        pad_id, padded, masks = self.pad_token_id, [], []
        for row in ids:
            fill = max(width - len(row), 0)  # longer rows stay as they are, as in transformers
            if self.padding_side == "left":
                padded.append([pad_id] * fill + row)
                masks.append([0] * fill + [1] * len(row))
            else:
                padded.append(row + [pad_id] * fill)
                masks.append([1] * len(row) + [0] * fill)
        return padded, masks

    # ----- decoding -------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (list, 1-D or [1, T] tensor, numpy array), exactly as encoded."""
        try:
            ids = ids.tolist() if hasattr(ids, "tolist") else ids
            ids = [ids] if isinstance(ids, int) else list(ids)
            if len(ids) == 1 and isinstance(ids[0], list):  # a [1, T] batch of one
                ids = ids[0]
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:
            raise TokenizerError(f"decode needs a flat sequence of non-negative int ids: {e}") from None

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Decode each row of a batch (list of lists, 2-D tensor or array)."""
        try:
            rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
            rows = [row.tolist() if hasattr(row, "tolist") else list(row) for row in rows]
            return self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:
            raise TokenizerError(f"batch_decode needs sequences of non-negative int ids: {e}") from None

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
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is not None and not isinstance(template, str):
            raise ConfigError(f"chat_template must be a string or None, not {type(template).__name__}")
        self._chat_template = template

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_tensors: str | None = None,
                            chat_template: str | None = None, **variables: Any) -> str | list[int] | Any:
        """Messages → the prompt text (tokenize=False) or its ids, as transformers does: the
        template (this tokenizer's, or `chat_template`) renders in a jinja2 sandbox with the
        special tokens defined; the ids add no special tokens beyond those the template wrote."""
        from pocketlm.chat import render_chat

        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise TokenizerError("this tokenizer has no chat template; pass chat_template=... or format "
                                 "the conversation yourself")
        specials = {f"{role}_token": token for role, token in self._special.items() if token is not None}
        text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           **{**specials, **variables})
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False, return_tensors=return_tensors)

    def _set_special(self, role: str, token: str | AddedToken | dict | None) -> None:
        token = _token_content(token, f"{role}_token")
        if token is not None:
            token_id = self._backend.token_to_id(token)
            if token_id is None:
                raise TokenizerError(
                    f"{role}_token {token!r} is not in the vocabulary; use one of its tokens "
                    "(a common choice is `tokenizer.pad_token = tokenizer.eos_token`)"
                )
            added = self._backend.get_added_tokens_decoder().get(token_id)
            if added is None or not added.special:
                # Registering it as special makes the backend keep it whole when it appears in
                # text and drop it on skip_special_tokens, as transformers does.
                self._backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self._special[role] = token

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
    special_tokens = list(dict.fromkeys(special_tokens))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ConfigError(
            f"vocab_size={vocab_size!r} is too small: byte-level BPE needs at least {smallest} "
            f"({len(alphabet)} byte symbols + {len(special_tokens)} special tokens)"
        )
    for token in named_tokens:
        if token is not None and token not in special_tokens:
            raise ConfigError(f"{token!r} is used as a bos/eos/pad token but is not in special_tokens")
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


def _token_content(token: str | AddedToken | dict | None, where: str) -> str | None:
    """A special token as configs write it (string, AddedToken, or {"content": ...}) → string."""
    if isinstance(token, AddedToken):
        return token.content
    if isinstance(token, dict):
        token = token.get("content")
    if token is None or isinstance(token, str):
        return token
    raise TokenizerError(f"{where} must be a token string, not {token!r}")


def _as_tensor(rows: list[list[int]], kind: str) -> Any:
    if kind not in ("pt", "np"):
        raise TokenizerError(f"return_tensors must be 'pt', 'np' or None, not {kind!r}")
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise TokenizerError(
            f"cannot make a tensor of sequences with lengths {sorted(lengths)}; "
            "pass padding=True (and truncation=True for a fixed limit)"
        )
    array = np.array(rows, dtype=np.int64).reshape(len(rows), lengths.pop() if lengths else 0)
    if kind == "np":
        return array
    import torch  # deferred: tokenizing for data preparation should not pay for importing torch

    return torch.from_numpy(array)
