"""The Hugging Face-style facade: `AutoTokenizer`, `AutoModelForCausalLM` and the familiar
aliases (`GPT2Tokenizer`, `GPT2LMHeadModel`, `LlamaForCausalLM`), so code written for
transformers runs on pocketlm with only its import line changed:

    tokenizer = GPT2Tokenizer.from_pretrained(path)
    model = GPT2LMHeadModel.from_pretrained(path)
    out = model.generate(tokenizer.encode("Once upon a time", return_tensors="pt"), max_length=100)

`from_pretrained` loads local checkpoints only and never returns random weights; untrained
models come from `from_config` with a `ModelConfig` or a preset name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from pocketlm import checkpoint, registry
from pocketlm.config import ModelConfig, resolve_device
from pocketlm.errors import ConfigError, FormatError
from pocketlm.generate import GenerateOutput, GenerationConfig, Generator, transition_scores
from pocketlm.model import SequenceClassifier, Transformer, check_attn_implementation
from pocketlm.quant import quantize_model
from pocketlm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class PretrainedModel:
    """`from_pretrained`, `from_config` and `save_pretrained` for the model classes below, which
    put it before their Transformer (CausalLM, SequenceClassification)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.generation_config = GenerationConfig()

    @property
    def generation_config(self) -> GenerationConfig:
        """The defaults `generate` starts from (generation_config.json), with transformers'
        attribute names: `model.generation_config.pad_token_id = tok.eos_token_id`."""
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        # a dict (as read from generation_config.json) or transformers' GenerationConfig becomes ours
        self._generation_config = GenerationConfig.of(value)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None, torch_dtype=None,
                        allow_pickle: bool = False, device_map=None, attn_implementation: str | None = None,
                        revision: str | None = None, trust_remote_code: bool = False,
                        local_files_only: bool = False, low_cpu_mem_usage: bool | None = None,
                        cache_dir: str | Path | None = None, base_model=None, _adapt_config=None,
                        **unknown) -> "CausalLM":
        """Load a local checkpoint folder, a GGUF file (dequantized, float32 unless `dtype` says
        otherwise), a training run folder, a LoRA adapter folder or a pulled registry model by
        name. `torch_dtype` is an alias of `dtype`; "auto" keeps the stored dtype.

        An adapter folder loads its base (the one its adapter_config.json records, or
        `base_model`: a folder, GGUF file or registry name) and folds the adapter into the
        weights: a plain model, as fast as the base. To train the adapter further, load the base
        and call pocketlm.lora.load_adapter instead, which keeps it separate.

        transformers' loading keywords work as far as they mean something for a local model on
        one device: `device_map` ("auto", one device, or a map that puts every part on the same
        device), `attn_implementation` (see model.check_attn_implementation), `revision` (None
        or "main"). `local_files_only`, `low_cpu_mem_usage` and `cache_dir` change nothing:
        pocketlm never downloads while loading and always reads one tensor at a time; nor does
        `trust_remote_code`: pocketlm never runs code from a checkpoint. All of it is checked
        before a weight is read; an unknown keyword is a ConfigError that lists these."""
        _refuse_unknown("from_pretrained", unknown, cls.from_pretrained, PretrainedModel.from_pretrained)
        device = _load_device(device, device_map)
        dtype = _one_dtype(dtype, torch_dtype)
        attn_implementation = check_attn_implementation(attn_implementation)
        _check_revision(revision)
        if trust_remote_code:
            log.warning("trust_remote_code=True changes nothing: pocketlm never runs code from a checkpoint, "
                        "it loads the gpt2, llama and pocketlm architectures with its own")
        ref = registry.resolve(path, base=base_model)
        model = cls._load(ref, device=device, dtype=dtype, allow_pickle=allow_pickle, adapt_config=_adapt_config)
        model.attn_implementation = attn_implementation
        return model

    @classmethod
    def _load(cls, ref: registry.ModelRef, *, device, dtype, allow_pickle: bool, adapt_config) -> "CausalLM":
        """The model `ref` names, its config passed through `adapt_config` (a classifier's labels)."""
        if ref.kind == "adapter":
            return cls._from_adapter(ref, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                     adapt_config=adapt_config)
        if ref.kind == "gguf":
            from pocketlm.gguf import GGUFFile

            with GGUFFile(ref.path) as f:
                return cls._from_gguf(f, device=device, dtype=dtype, adapt_config=adapt_config)
        model = checkpoint.load_pretrained(ref.path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                           cls=cls, adapt_config=adapt_config)
        model.generation_config = checkpoint.read_generation_config(ref.path)
        return model

    @classmethod
    def _from_gguf(cls, f, device=None, dtype=None, adapt_config=None) -> "CausalLM":
        from pocketlm.gguf import load_gguf

        model = load_gguf(f, device=device, dtype=dtype, cls=cls, adapt_config=adapt_config)
        model.generation_config = _special_token_ids(model.config)
        return model

    @classmethod
    def _from_adapter(cls, ref: registry.ModelRef, **load) -> "CausalLM":
        """The adapter's base (a GGUF base dequantized) with the adapter folded into its weights."""
        from pocketlm import lora

        task = lora.read_adapter_config(ref.path).task_type
        if task == "SEQ_CLS" and not issubclass(cls, SequenceClassifier):
            raise ConfigError(f"{ref.path} is a classification adapter (task_type SEQ_CLS); load it with "
                              "AutoModelForSequenceClassification.from_pretrained or pipeline('text-classification')")
        # adapters fold into float weights: a GGUF base is dequantized; int8/int4 quantize after
        bits = checkpoint.quant_bits(load["dtype"])
        if bits or (load["dtype"] in (None, "auto") and ref.base.kind == "gguf"):
            load["dtype"] = torch.float32
        with checkpoint.heads_supplied() if task == "SEQ_CLS" else contextlib.nullcontext():
            model = cls._load(ref.base, **load)  # (the adapter holds the trained head)
        checkpoint.check_tokenizer_fits(ref.path, model.config)  # the adapter folder's own tokenizer
        try:
            lora.load_adapter(model, ref.path)
        except (ConfigError, FormatError) as e:
            raise type(e)(f"the LoRA adapter {ref.path} does not fit its base {ref.base.given}: {e}") from None
        lora.merge_lora(model)
        if bits:
            quantize_model(model, bits)
        if (ref.path / "generation_config.json").is_file():
            model.generation_config = checkpoint.read_generation_config(ref.path)
        return model

    @classmethod
    def from_config(cls, config: ModelConfig | str | dict, *, device=None, dtype=None, torch_dtype=None,
                    attn_implementation: str | None = None) -> "CausalLM":
        """A randomly initialised model from a ModelConfig, a preset name or an HF config dict."""
        device = _load_device(device, None)
        dtype = _one_dtype(dtype, torch_dtype)
        attn_implementation = check_attn_implementation(attn_implementation)
        if isinstance(config, str):
            config = ModelConfig.preset(config)
        elif isinstance(config, dict):
            config = ModelConfig.from_hf_config(config)
        model = cls(config)
        model.attn_implementation = attn_implementation
        if dtype is not None:
            model = model.to(checkpoint._resolve_dtype(dtype, torch.float32))
        model.generation_config = _special_token_ids(config)
        return model.to(device) if device is not None else model

    def save_pretrained(self, folder: str | Path, tokenizer: Tokenizer | None = None,
                        max_shard_size: int | str | None = None, *, safe_serialization: bool = True,
                        push_to_hub: bool = False, **unknown) -> Path:
        """Write a checkpoint folder (checkpoint.save_pretrained). As in transformers,
        `max_shard_size` is bytes or a size such as "200KB" or "5GB" (decimal units), and
        safe_serialization=False still writes safetensors: pocketlm never writes pickle.
        push_to_hub=True is refused before anything is written: pocketlm does not upload."""
        _refuse_unknown("save_pretrained", unknown, self.save_pretrained)
        if push_to_hub:
            raise ConfigError("push_to_hub=True: pocketlm does not upload to a model hub; save the folder, "
                              "then upload it with the hub's own tools")
        if not safe_serialization:
            log.warning("safe_serialization=False: pocketlm writes safetensors only, never pickle "
                        "(as transformers 5 does)")
        return checkpoint.save_pretrained(self, folder, tokenizer=tokenizer,
                                          generation_config=self.generation_config.to_dict(),
                                          max_shard_size=max_shard_size)


class CausalLM(PretrainedModel, Transformer):
    """A `Transformer` with `from_pretrained`, `save_pretrained` and `generate`."""

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, streamer=None, tokenizer: Tokenizer | None = None,
                 **kwargs) -> torch.Tensor | GenerateOutput:
        """transformers-style generate: returns the prompt followed by the new tokens, or a
        GenerateOutput (sequences, scores, logits, beam scores) with return_dict_in_generate=True.

        Settings come from the call, then `generation_config` (ours, a dict, or transformers'
        GenerationConfig), then `model.generation_config`. When `do_sample` is not passed, an
        explicit temperature/top_k/top_p/min_p or several return sequences without beams mean
        sampling (see pocketlm.generate). `streamer` is an object with put(tokens)/end() as in
        transformers (TextStreamer), which gets the prompt first and then each step's new tokens,
        or a callable, which gets only the new tokens. `tokenizer` is needed for
        `stop_strings`. `use_cache` is accepted and changes nothing: pocketlm always decodes
        from its KV cache."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ConfigError("generate needs input_ids: the prompt's token ids, e.g. tokenizer(text, "
                              "return_tensors='pt').input_ids")
        kwargs.pop("use_cache", None)
        if generation_config is not None:
            kwargs = {**GenerationConfig.of(generation_config).explicit(), **kwargs}
        on_tokens = streamer  # a callable, or None
        if hasattr(streamer, "put"):  # a transformers-style streamer takes the prompt first
            streamer.put(torch.as_tensor(input_ids).cpu())
            on_tokens = streamer.put
        out = Generator(self, tokenizer).generate_ids(input_ids, attention_mask, on_tokens=on_tokens, **kwargs)
        if hasattr(streamer, "end"):
            streamer.end()
        return out

    def compute_transition_scores(self, sequences: torch.Tensor, scores, beam_indices: torch.Tensor | None = None,
                                  normalize_logits: bool = False) -> torch.Tensor:
        """Each generated token's score from generate(..., return_dict_in_generate=True,
        output_scores=True): (rows, new tokens), as in transformers (pocketlm.generate.transition_scores)."""
        return transition_scores(sequences, scores, beam_indices, normalize_logits)


# accelerate's strategies for spreading a model over devices; with one device they all mean "auto"
_AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _load_device(device, device_map) -> torch.device | None:
    """The one device a model goes to, from `device` and/or transformers' `device_map`; None
    (neither given) leaves it on the CPU. A map must put every part on the same device."""
    if device_map is None:
        return None if device is None else _device(device, "device")
    if isinstance(device_map, dict):
        targets = {str(_device_name(v)) for v in device_map.values()}
        if len(targets) != 1:
            raise ConfigError(f"device_map={device_map!r} spreads the model over {sorted(targets)}; pocketlm "
                              "keeps a model on one device: pass device_map='auto' or a single device")
        device_map = next(iter(device_map.values()))
    mapped = _device("auto" if device_map in _AUTO_DEVICE_MAPS else device_map, "device_map")
    if device is not None and _device(device, "device") != mapped:
        raise ConfigError(f"device={device!r} and device_map={device_map!r} name different devices; pass one")
    return mapped


def _device_name(value):
    # transformers reads a bare integer in a device map as the accelerator of that index
    return f"cuda:{value}" if isinstance(value, int) and not isinstance(value, bool) else value


def _device(value, keyword: str) -> torch.device:
    """resolve_device(value), with its errors worded for a Python caller (it words them for the CLI)."""
    name = str(_device_name(value))
    try:
        return resolve_device(name)
    except ConfigError:
        if name.startswith("cuda"):
            raise ConfigError(f"{keyword}={value!r}: this machine has no CUDA GPU that torch can use; pass "
                              f"{keyword}='cpu', or 'auto' to take a GPU only when there is one") from None
        raise ConfigError(f"{keyword}={value!r} is not a device; use 'cpu', 'cuda', 'cuda:1', 'mps' "
                          "or 'auto'") from None


def _special_token_ids(config: ModelConfig) -> dict[str, int]:
    """The generation settings a model without generation_config.json starts from: its special ids."""
    return {k: v for k in ("bos_token_id", "eos_token_id", "pad_token_id") if (v := getattr(config, k)) is not None}


def _check_revision(revision: str | None) -> None:
    if revision not in (None, "main"):
        raise ConfigError(f"revision={revision!r}: pocketlm loads local folders and files, which have no "
                          "revisions; put that revision's files in a folder and pass its path")


def _one_dtype(dtype, torch_dtype):
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ConfigError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one")
    return dtype if dtype is not None else torch_dtype


def _refuse_unknown(method: str, unknown: dict[str, Any], *bound) -> None:
    """A keyword pocketlm does not know is an error that names the ones it does (those of every
    function in `bound`: a subclass's own and those it passes on), rather than a TypeError, or
    being ignored silently."""
    if unknown:
        params = [p for b in bound for p in list(inspect.signature(b).parameters.values())[1:]]  # after the path
        known = dict.fromkeys(p.name for p in params if p.kind is not p.VAR_KEYWORD and not p.name.startswith("_"))
        raise ConfigError(f"{method}() does not know the keyword(s) {', '.join(sorted(unknown))}; "
                          f"it takes {', '.join(known)}")


def load_model_and_tokenizer(model: str | Path | registry.ModelRef, *, device=None,
                             dtype=None) -> tuple[CausalLM, Tokenizer]:
    """Both halves of a local checkpoint folder, run folder, GGUF file (parsed once), LoRA adapter
    folder (its base's tokenizer unless it has its own) or pulled registry name; the reference
    is resolved once for both."""
    ref = registry.resolve(model)
    if ref.kind == "gguf":
        from pocketlm.gguf import GGUFFile

        with GGUFFile(ref.path) as f:
            return gguf_model_and_tokenizer(f, device=device, dtype=dtype)
    return CausalLM.from_pretrained(ref, device=device, dtype=dtype), AutoTokenizer.from_pretrained(ref)


def gguf_model_and_tokenizer(f, *, device=None, dtype=None) -> tuple[CausalLM, Tokenizer]:
    """Model and tokenizer from one open GGUFFile (its header parsed once for both)."""
    from pocketlm.gguf import tokenizer_from_gguf

    return CausalLM._from_gguf(f, device=device, dtype=dtype), tokenizer_from_gguf(f)


class AutoModelForCausalLM:
    """Entry point as in transformers; returns a `CausalLM`."""

    from_pretrained = CausalLM.from_pretrained
    from_config = CausalLM.from_config

    def __init__(self):
        raise TypeError("use AutoModelForCausalLM.from_pretrained(path) or .from_config(config)")


class SequenceClassification(PretrainedModel, SequenceClassifier):
    """A `SequenceClassifier` (score head on the last non-pad token, see pocketlm.model) with
    `from_pretrained`, `from_config` and `save_pretrained`, as transformers'
    AutoModelForSequenceClassification: its folders load there with the same logits, and back.

    Label keywords set the head: `num_labels` (labels LABEL_0.. LABEL_{n-1}), or `id2label` /
    `label2id` with the names, and `problem_type`; a checkpoint's own labels are kept when none
    are given. A checkpoint without a score head (a causal LM) gets a freshly initialised one,
    with a warning. When the config has no pad token, EOS serves as pad and is recorded as
    config.pad_token_id (no new token: the embeddings keep their size)."""

    @classmethod
    def from_pretrained(cls, path: str | Path, *, num_labels: int | None = None,
                        id2label: dict | None = None, label2id: dict | None = None,
                        problem_type: str | None = None, **kwargs) -> "SequenceClassification":
        """Load as PretrainedModel.from_pretrained (same keywords), with the label keywords above.
        A classification adapter's labels come from its label_config.json (see pocketlm.lora)."""
        labels = _label_settings(num_labels, id2label, label2id, problem_type)
        ref = registry.resolve(path, base=kwargs.pop("base_model", None))
        if ref.kind == "adapter":
            from pocketlm.lora import read_labels

            labels = {**read_labels(ref.path), **labels}
        return super().from_pretrained(ref, _adapt_config=lambda config: _classifier_config(config, labels),
                                       **kwargs)

    @classmethod
    def from_config(cls, config: ModelConfig | str | dict, *, num_labels: int | None = None,
                    id2label: dict | None = None, label2id: dict | None = None,
                    problem_type: str | None = None, **kwargs) -> "SequenceClassification":
        """A randomly initialised classifier (as PretrainedModel.from_config) with the label keywords above."""
        if isinstance(config, str):
            config = ModelConfig.preset(config)
        elif isinstance(config, dict):
            config = ModelConfig.from_hf_config(config)
        labels = _label_settings(num_labels, id2label, label2id, problem_type)
        return super().from_config(_classifier_config(config, labels), **kwargs)


def _label_settings(num_labels, id2label, label2id, problem_type) -> dict[str, Any]:
    """The config fields the label keywords set (those given)."""
    if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool)
                                   or num_labels < 1):
        raise ConfigError(f"num_labels must be a positive integer, got {num_labels!r}")
    if id2label is None and label2id is not None:
        id2label = {i: label for label, i in dict(label2id).items()}
    if id2label is not None and num_labels is not None and len(id2label) != num_labels:
        raise ConfigError(f"num_labels={num_labels} but id2label names {len(id2label)} labels; pass one of them")
    if id2label is None and num_labels is not None:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}  # transformers' default names
    settings = {"problem_type": problem_type} if problem_type is not None else {}
    if id2label is not None:
        settings.update(id2label=id2label, label2id=label2id)
    return settings


def _classifier_config(config: ModelConfig, labels: dict[str, Any]) -> ModelConfig:
    """`config` with the label settings applied, labels LABEL_0, LABEL_1 when it has none, and EOS
    as the pad token when it has no pad token."""
    config = dataclasses.replace(config, **labels)  # validated again, label ids included
    if config.id2label is None:
        config = dataclasses.replace(config, id2label={0: "LABEL_0", 1: "LABEL_1"})
    if config.pad_token_id is None and config.eos_token_ids:
        log.info("the model has no pad token: using EOS (id %d) as pad, as config.pad_token_id",
                 config.eos_token_ids[0])
        config = dataclasses.replace(config, pad_token_id=config.eos_token_ids[0])
    return config


class AutoModelForSequenceClassification:
    """Entry point as in transformers; returns a `SequenceClassification`."""

    from_pretrained = SequenceClassification.from_pretrained
    from_config = SequenceClassification.from_config

    def __init__(self):
        raise TypeError("use AutoModelForSequenceClassification.from_pretrained(path, num_labels=...) "
                        "or .from_config(config, num_labels=...)")


GPT2ForSequenceClassification = LlamaForSequenceClassification = AutoModelForSequenceClassification


class AutoConfig:
    """Entry point as in transformers; returns the `ModelConfig` of a checkpoint, which answers
    transformers' attribute names (hidden_size, num_hidden_layers, ...) and goes to
    `AutoModelForCausalLM.from_config` for an untrained model of that shape."""

    def __init__(self):
        raise TypeError("use AutoConfig.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path: str | Path | registry.ModelRef, *, revision: str | None = None,
                        local_files_only: bool = False, trust_remote_code: bool = False,
                        cache_dir: str | Path | None = None, **unknown) -> ModelConfig:
        """The config of a local checkpoint folder, run folder, GGUF file or pulled registry name
        (the keywords as in AutoModelForCausalLM.from_pretrained)."""
        _refuse_unknown("AutoConfig.from_pretrained", unknown, AutoConfig.from_pretrained)
        _check_revision(revision)
        return _config_of(registry.resolve(path))


def _config_of(ref: registry.ModelRef) -> ModelConfig:
    """The config `ref`'s model loads with; a classification adapter's is its base's with its labels."""
    if ref.kind == "adapter":
        from pocketlm.lora import read_labels

        labels = read_labels(ref.path)
        config = _config_of(ref.base)
        return _classifier_config(config, labels) if labels else config
    if ref.kind == "gguf":
        from pocketlm.gguf import GGUFFile, config_from_gguf

        with GGUFFile(ref.path) as f:
            return config_from_gguf(f)
    return checkpoint.load_config(ref.path)


class AutoTokenizer:
    """Entry point as in transformers; returns a `Tokenizer`."""

    def __init__(self):
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path: str | Path | registry.ModelRef, *, padding_side: str | None = None,
                        model_max_length: int | None = None, chat_template: str | None = None,
                        clean_up_tokenization_spaces: bool | None = None, model_input_names: list[str] | None = None,
                        bos_token: str | None = None, eos_token: str | None = None, unk_token: str | None = None,
                        pad_token: str | None = None, sep_token: str | None = None, cls_token: str | None = None,
                        mask_token: str | None = None, additional_special_tokens: list[str] | None = None,
                        subfolder: str | None = None, revision: str | None = None, use_fast: bool = True,
                        local_files_only: bool = False, trust_remote_code: bool = False,
                        cache_dir: str | Path | None = None, force_download: bool = False, token: Any = None,
                        base_model=None, **unknown) -> Tokenizer:
        """The tokenizer of a local checkpoint folder (or `subfolder` of it), tokenizer.json, GGUF
        file, run folder, LoRA adapter folder (its own tokenizer files, else its base's, the base
        being `base_model` when given) or pulled registry name.

        transformers' keywords work as far as they mean something locally. The settings
        (padding_side, model_max_length, chat_template, clean_up_tokenization_spaces,
        model_input_names) replace the saved ones; special tokens (`pad_token="<pad>"`, ...) are
        named, and added to the vocabulary when new, as transformers does. `revision` must be None
        or "main". use_fast, local_files_only, trust_remote_code, cache_dir, force_download and
        token change nothing: the tokenizer is always the fast (Rust) one, read from local files,
        and no code from a checkpoint runs. An unknown keyword is a ConfigError that lists these."""
        _refuse_unknown("AutoTokenizer.from_pretrained", unknown, AutoTokenizer.from_pretrained)
        _check_revision(revision)
        ref = registry.resolve(path, base=base_model)
        if subfolder:
            ref = registry.resolve(Path(ref.path) / subfolder)
        tokenizer = _tokenizer_of(ref)
        named = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                     sep_token=sep_token, cls_token=cls_token, mask_token=mask_token,
                     additional_special_tokens=additional_special_tokens)
        tokenizer.add_special_tokens({key: value for key, value in named.items() if value is not None})
        settings = dict(padding_side=padding_side, model_max_length=model_max_length, chat_template=chat_template,
                        clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                        model_input_names=model_input_names)
        for name, value in settings.items():
            if value is not None:
                setattr(tokenizer, name, value)  # the setters check each value
        return tokenizer


def _tokenizer_of(ref: registry.ModelRef) -> Tokenizer:
    if ref.kind == "adapter" and not any((ref.path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return _tokenizer_of(ref.base)
    if ref.kind == "gguf":
        from pocketlm.gguf import GGUFFile, tokenizer_from_gguf

        with GGUFFile(ref.path) as f:
            return tokenizer_from_gguf(f)
    return Tokenizer.from_pretrained(ref.path)


# the names from the classic snippets: same loaders, the checkpoint's config decides the family
GPT2Tokenizer = AutoTokenizer
GPT2LMHeadModel = AutoModelForCausalLM
LlamaForCausalLM = AutoModelForCausalLM


def __getattr__(name):
    # `from pocketlm.api import pipeline` as in transformers; pipelines imports this module, so it
    # loads on first use rather than at import (the imports stay one-directional)
    if name == "pipeline":
        from pocketlm.pipelines import pipeline

        return pipeline
    raise AttributeError(f"module 'pocketlm.api' has no attribute {name!r}")
