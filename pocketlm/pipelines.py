"""`pipeline(task, model)`: one call from a model reference to answers, as transformers' pipeline.

    clf = pipeline("sentiment-analysis", model="runs/sentiment")
    clf(["a great film", "a dull plot"])  # [{"label": "positive", "score": 0.97}, ...]
    gen = pipeline("text-generation", model="runs/demo")
    gen("Once upon a time", max_new_tokens=20, do_sample=False)  # [{"generated_text": "Once upon..."}]

This module sits on top of `api` and `generate`; nothing below imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pocketlm import registry
from pocketlm.api import AutoConfig, AutoTokenizer, CausalLM, SequenceClassification
from pocketlm.config import resolve_device
from pocketlm.errors import ConfigError


def pipeline(task: str, model: Any = None, tokenizer=None, device=None, **kwargs) -> "Pipeline":
    """A callable for `task` ("text-classification", its alias "sentiment-analysis", or
    "text-generation") on `model`: anything pocketlm loads (checkpoint folder, run folder, GGUF
    file, registry name) or a loaded model object, which then needs `tokenizer=` as in
    transformers. Other keywords become the call's defaults (`batch_size=8`, `max_new_tokens=20`)."""
    if task not in _TASKS:
        raise ConfigError(f"unknown pipeline task {task!r}; pocketlm knows {', '.join(sorted(_TASKS))}")
    if model is None:
        raise ConfigError(f"pipeline({task!r}) needs model=: a checkpoint folder, run folder, GGUF file or "
                          "registry name (pocketlm downloads no default model)")
    return _TASKS[task](task, model, tokenizer, device, kwargs)


class Pipeline:
    """A model and its tokenizer for one task; calling it runs the task."""

    kind: type = torch.nn.Module  # the model class the task needs

    def __init__(self, task: str, model: Any, tokenizer, device, defaults: dict[str, Any]):
        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ConfigError(f"pipeline({task!r}) given a model object needs tokenizer= as well, e.g. "
                                  "AutoTokenizer.from_pretrained(the same folder)")
            self._check_kind(task, model.config)
            if device is not None:
                model = model.to(resolve_device(device))
        else:
            ref = registry.resolve(model)
            self._check_kind(task, AutoConfig.from_pretrained(ref))
            tokenizer = AutoTokenizer.from_pretrained(ref) if tokenizer is None else tokenizer
            model = self.kind.from_pretrained(ref, device=device)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.task, self.model, self.tokenizer, self.defaults = task, model.eval(), tokenizer, defaults

    def _check_kind(self, task: str, config) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class TextClassificationPipeline(Pipeline):
    """`clf(texts, top_k=1, batch_size=1)` → `[{"label", "score"}]` per text, as transformers: the
    label names come from config.id2label; softmax over the labels, or sigmoid for multi-label
    problems and single-output heads; `top_k=None` gives every label, best first, per text.
    Batches are padded with config.pad_token_id, so the batch size never changes a score (see
    _padded; transformers pads with the tokenizer's pad token)."""

    kind = SequenceClassification

    def _check_kind(self, task: str, config) -> None:
        if config.id2label is None:
            raise ConfigError(f"pipeline({task!r}) needs a sequence-classification checkpoint (config.json with "
                              "id2label), such as the output of `pocketlm finetune classify`; this model is a "
                              "causal LM. Fine-tune it for classification first (a zero-shot scorer that asks a "
                              "causal LM is planned but not here yet)")

    def __call__(self, texts: str | list[str], **kwargs) -> list:
        options = {"top_k": 1, "batch_size": 1, **self.defaults, **kwargs}
        unknown = set(options) - {"top_k", "batch_size"}
        if unknown:
            raise ConfigError(f"text-classification does not know {', '.join(sorted(unknown))}; "
                              "it takes top_k and batch_size")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        scores = torch.cat([self._scores(texts[i:i + options["batch_size"]])
                            for i in range(0, len(texts), options["batch_size"])]) if texts else torch.empty(0)
        results = [self._labelled(row, options["top_k"]) for row in scores]
        if "top_k" not in {**self.defaults, **kwargs}:
            return [r[0] for r in results]  # the default: one best label per text, as a flat list
        return results[0] if single else results

    @torch.no_grad()
    def _scores(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self._padded([self.tokenizer(text)["input_ids"] for text in texts])
        logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device)).logits.float().cpu()
        config = self.model.config
        if config.problem_type == "regression":
            return logits
        if config.problem_type == "multi_label_classification" or logits.shape[-1] == 1:
            return logits.sigmoid()  # each label on its own, as transformers decides
        return logits.softmax(-1)

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows padded with the model's pad token: the classifier reads each text at its last
        token that is not config.pad_token_id, so padding with any other id (a tokenizer whose pad
        differs) would change the answer with the batch size."""
        width, pad = max(map(len, rows)), self.model.config.pad_token_id
        ids = torch.full((len(rows), width), pad if pad is not None else 0)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            cut = slice(width - len(row), width) if self.tokenizer.padding_side == "left" else slice(0, len(row))
            ids[i, cut], mask[i, cut] = torch.tensor(row, dtype=ids.dtype), 1
        return ids, mask

    def _labelled(self, scores: torch.Tensor, top_k: int | None) -> list[dict[str, Any]]:
        order = scores.argsort(descending=True, stable=True)[:top_k]
        names = self.model.config.id2label
        return [{"label": names[int(i)], "score": scores[i].item()} for i in order]


class TextGenerationPipeline(Pipeline):
    """`gen(prompt, max_new_tokens=..., do_sample=False, return_full_text=True)` →
    `[{"generated_text": ...}]` per prompt, as transformers; a chat (list of {"role", "content"})
    goes through the chat template and comes back with the new assistant message appended.
    Other keywords go to `model.generate`."""

    kind = CausalLM

    def _check_kind(self, task: str, config) -> None:
        if config.id2label is not None:
            raise ConfigError(f"pipeline({task!r}) needs a causal LM; this checkpoint is a sequence classifier "
                              "(its config.json has id2label): use pipeline('text-classification', model=...)")

    def __call__(self, inputs, **kwargs) -> list:
        kwargs = {**self.defaults, **kwargs}
        if _is_chat(inputs) or isinstance(inputs, str):
            return self._one(inputs, kwargs)
        return [self._one(item, kwargs) for item in inputs]

    @torch.no_grad()
    def _one(self, prompt, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        kwargs = dict(kwargs)
        full_text = kwargs.pop("return_full_text", True)
        kwargs.pop("batch_size", None)  # accepted as transformers does; prompts run one at a time
        if _is_chat(prompt):
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=False)
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = self.model.generate(ids.to(self.device), tokenizer=self.tokenizer, **kwargs)
        new = self.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        if _is_chat(prompt):
            return [{"generated_text": [*prompt, {"role": "assistant", "content": new}]}]
        return [{"generated_text": prompt + new if full_text else new}]


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)


_TASKS = {"text-classification": TextClassificationPipeline, "sentiment-analysis": TextClassificationPipeline,
          "text-generation": TextGenerationPipeline}
