"""`pipeline(task, model)`: one call from a model reference to answers, as transformers' pipeline.

    clf = pipeline("sentiment-analysis", model="runs/sentiment")
    clf(["a great film", "a dull plot"])  # [{"label": "positive", "score": 0.97}, ...]
    gen = pipeline("text-generation", model="runs/demo")
    gen("Once upon a time", max_new_tokens=20, do_sample=False)  # [{"generated_text": "Once upon..."}]
    zs = pipeline("zero-shot-classification", model="smollm2-135m-instruct")
    zs("a great film", candidate_labels=["positive", "negative"])  # {"sequence", "labels", "scores"}
    pipeline("summarization", model="smollm2-135m-instruct")(text)  # [{"summary_text": ...}]
    pipeline("translation_en_to_fr", model=...)("Good morning")     # [{"translation_text": ...}]
    pipeline("question-answering", model=...)(question=q, context=c)  # {"score", "start", "end", "answer"}

Summarization, translation and question answering are done by an instruct model from an
instruction (pocketlm.tasks) and answer in the shapes transformers 4 gave them; the pinned
transformers 5 has removed those three task names, pointing to text generation with a chat model
(which is what pocketlm does underneath).

This module sits on top of `api` and `generate`; nothing below imports it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pocketlm import registry
from pocketlm.api import AutoConfig, AutoTokenizer, CausalLM, SequenceClassification
from pocketlm.config import resolve_device
from pocketlm.errors import ConfigError
from pocketlm.zeroshot import ZeroShotClassifier


def pipeline(task: str, model: Any = None, tokenizer=None, device=None, **kwargs) -> "Pipeline":
    """A callable for `task` ("text-classification", its alias "sentiment-analysis",
    "zero-shot-classification", "text-generation", "chat", "feature-extraction", "summarization",
    "translation" / "translation_en_to_fr", "question-answering") on `model`: anything pocketlm loads
    (checkpoint folder, run folder, GGUF file, registry name) or a loaded model object, which then
    needs `tokenizer=` as in transformers. Other keywords become the call's defaults
    (`batch_size=8`, `max_new_tokens=20`, `candidate_labels=[...]`). Text classification with a
    causal LM needs `candidate_labels=`: the labels are then scored zero-shot (pocketlm.zeroshot)."""
    languages = _TRANSLATION.fullmatch(task) if isinstance(task, str) else None
    if languages:  # translation_en_to_fr: the languages are defaults a call may override
        kwargs = {"src_lang": languages[1], "tgt_lang": languages[2], **kwargs}
    elif task not in _TASKS:
        raise ConfigError(f"unknown pipeline task {task!r}; pocketlm knows {', '.join(sorted(_TASKS))} "
                          "(and translation_xx_to_yy)")
    if model is None:
        raise ConfigError(f"pipeline({task!r}) needs model=: a checkpoint folder, run folder, GGUF file or "
                          "registry name (pocketlm downloads no default model)")
    kind = TranslationPipeline if languages else _TASKS[task]
    if kind is TextClassificationPipeline and "candidate_labels" in kwargs:
        kind = ZeroShotTextClassificationPipeline
    return kind(task, model, tokenizer, device, kwargs)


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
                              "causal LM. Pass candidate_labels=[...] to have it score the labels zero-shot "
                              "(or use pipeline('zero-shot-classification', ...)), or fine-tune it first")

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

    @property
    def id2label(self) -> dict[int, str]:
        return self.model.config.id2label

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
        names = self.id2label
        return [{"label": names[int(i)], "score": scores[i].item()} for i in order]


class ZeroShotTextClassificationPipeline(TextClassificationPipeline):
    """text-classification on a causal LM given `candidate_labels=` (and optionally `instruction=`
    and `chat=`, see ZeroShotClassifier): the zero-shot label probabilities, in
    text-classification's output and with its options."""

    kind = CausalLM

    def __init__(self, task: str, model: Any, tokenizer, device, defaults: dict[str, Any]):
        defaults = dict(defaults)
        labels = _label_list(defaults.pop("candidate_labels"))
        instruction, chat = defaults.pop("instruction", None), defaults.pop("chat", False)
        super().__init__(task, model, tokenizer, device, defaults)
        self.classifier = ZeroShotClassifier(self.model, self.tokenizer, labels, instruction, chat)

    def _check_kind(self, task: str, config) -> None:
        if config.id2label is not None:
            raise ConfigError(f"candidate_labels= has a causal LM score labels zero-shot; this checkpoint is a "
                              f"sequence classifier with its own labels ({', '.join(config.id2label.values())}): "
                              "drop candidate_labels")

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classifier.labels))

    def _scores(self, texts: list[str]) -> torch.Tensor:
        # one label alone: its own probability, as the zero-shot pipeline gives it
        if len(self.classifier.labels) == 1:
            return self.classifier.log_likelihoods(texts, batch_size=len(texts)).exp()
        return self.classifier.scores(texts, batch_size=len(texts))


class ZeroShotClassificationPipeline(Pipeline):
    """`zs(texts, candidate_labels=[...])` → `{"sequence", "labels", "scores"}` per text, labels
    best first, as transformers' zero-shot-classification (a single string gives one dict).
    pocketlm asks a causal LM instead of an NLI model: each label's likelihood after an
    instruction (pocketlm.zeroshot), so `instruction=` (with {text} and {labels}) takes the place
    of `hypothesis_template`. Scores sum to 1 over the labels; with `multi_label=True` or a single
    label each score is the model's own probability of that label's tokens. `candidate_labels`
    may be a comma-separated string; `chat=` picks the prompt form; `batch_size=1` by default."""

    kind = CausalLM
    options = ("candidate_labels", "instruction", "chat", "multi_label", "batch_size")

    def _check_kind(self, task: str, config) -> None:
        if config.id2label is not None:
            raise ConfigError(f"pipeline({task!r}) asks a causal LM; this checkpoint is a sequence classifier "
                              "(its config.json has id2label): use pipeline('text-classification', model=...)")

    def __call__(self, sequences: str | list[str], *args, **kwargs):
        if args:
            if len(args) > 1 or "candidate_labels" in kwargs:
                raise ConfigError("zero-shot-classification takes the texts and, at most, the candidate labels "
                                  "as positional arguments")
            kwargs["candidate_labels"] = args[0]
        options = {"batch_size": 1, "multi_label": False, "instruction": None, "chat": False,
                   **self.defaults, **kwargs}
        if "hypothesis_template" in options:
            raise ConfigError("hypothesis_template is for NLI models; pocketlm's zero-shot scorer asks a causal LM, "
                              "so pass instruction= with {text} (and {labels}) instead")
        unknown = set(options) - set(self.options)
        if unknown:
            raise ConfigError(f"zero-shot-classification does not know {', '.join(sorted(unknown))}; "
                              f"it takes {', '.join(self.options)}")
        if options.get("candidate_labels") is None:
            raise ConfigError("zero-shot-classification needs candidate_labels=[...]: the label names to choose from")
        labels = _label_list(options["candidate_labels"])
        classifier = ZeroShotClassifier(self.model, self.tokenizer, labels, options["instruction"], options["chat"])
        single = isinstance(sequences, str)
        texts = [sequences] if single else list(sequences)
        independent = options["multi_label"] or len(labels) == 1  # each label's own probability
        scores = (classifier.log_likelihoods(texts, options["batch_size"]).exp() if independent
                  else classifier.scores(texts, options["batch_size"]))
        results = []
        for text, row in zip(texts, scores):
            order = row.argsort(descending=True, stable=True).tolist()
            results.append({"sequence": text, "labels": [labels[i] for i in order],
                            "scores": [row[i].item() for i in order]})
        return results[0] if single else results


def _label_list(labels) -> list[str]:
    """Candidate labels as a list: a list of names, or one comma-separated string (as transformers reads it)."""
    if isinstance(labels, str):
        return [label.strip() for label in labels.split(",") if label.strip()]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
        raise ConfigError(f"candidate_labels must be a list of label names or a comma-separated string, "
                          f"got {labels!r:.80}")
    return list(labels)


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


class FeatureExtractionPipeline(Pipeline):
    """`fe(text)` → the last hidden state of every token, nested lists of shape [1][tokens][hidden]
    (a list of texts gives one such per text; `return_tensors=True` gives (1, tokens, hidden)
    tensors), as transformers' feature-extraction pipeline. The model is a causal LM (its final,
    normed hidden states) or a BERT encoder folder such as minilm-l6 (its last layer's)."""

    kind = CausalLM

    def __init__(self, task: str, model: Any, tokenizer, device, defaults: dict[str, Any]):
        from pocketlm.encoder import BertModel, is_encoder_folder

        bert = None
        if isinstance(model, BertModel):
            bert = model
        elif not isinstance(model, torch.nn.Module):
            ref = registry.resolve(model)
            if is_encoder_folder(ref):
                bert = BertModel.from_pretrained(ref.path, device=resolve_device(device) if device else None)
                tokenizer = AutoTokenizer.from_pretrained(ref) if tokenizer is None else tokenizer
        if bert is None:
            super().__init__(task, model, tokenizer, device, defaults)
            return
        if tokenizer is None:
            raise ConfigError(f"pipeline({task!r}) given a model object needs tokenizer= as well")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.task, self.model, self.tokenizer, self.defaults = task, bert.eval(), tokenizer, defaults

    def _check_kind(self, task: str, config) -> None:
        TextGenerationPipeline._check_kind(self, task, config)

    def __call__(self, inputs, **kwargs):
        kwargs = {**self.defaults, **kwargs}
        as_tensors = kwargs.pop("return_tensors", False)
        kwargs.pop("batch_size", None)  # accepted as transformers does; texts run one at a time
        if kwargs:
            raise ConfigError(f"feature-extraction does not know {', '.join(sorted(kwargs))}")
        if isinstance(inputs, str):
            return self._one(inputs, as_tensors)
        return [self._one(text, as_tensors) for text in inputs]

    @torch.no_grad()
    def _one(self, text: str, as_tensors: bool):
        from pocketlm.encoder import BertModel

        if not isinstance(text, str):
            raise ConfigError(f"feature-extraction takes texts, got {type(text).__name__}")
        ids = torch.tensor([self.tokenizer.encode(text)], device=self.device)
        if isinstance(self.model, BertModel):
            hidden = self.model(ids)
        else:
            hidden = self.model(ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        hidden = hidden.float().cpu()
        return hidden if as_tensors else hidden.tolist()


class InstructionPipeline(Pipeline):
    """A task an instruct model does from an instruction (pocketlm.tasks): greedy by default;
    generation keywords (num_beams, max_new_tokens, do_sample, temperature, ...) pass through."""

    kind = CausalLM

    def _check_kind(self, task: str, config) -> None:
        TextGenerationPipeline._check_kind(self, task, config)

    @property
    def generator(self):
        from pocketlm.generate import Generator

        if "_generator" not in self.__dict__:
            self._generator = Generator(self.model, self.tokenizer)
        return self._generator

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        options = {**self.defaults, **kwargs}
        options.pop("batch_size", None)  # accepted as transformers does; texts run one at a time
        if "max_length" in options:  # transformers' name for the answer's length in these tasks
            options.setdefault("max_new_tokens", options.pop("max_length"))
        return options

    def _texts(self, inputs) -> list[str]:
        """One text or a list of them as a list (one result per text comes back either way)."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"{self.task} takes a text or a list of texts")
        return texts


class SummarizationPipeline(InstructionPipeline):
    """`summarizer(text)` → `[{"summary_text": ...}]`, one dict per text (transformers'
    summarization shape); texts longer than the window are summarized piece by piece."""

    def __call__(self, documents, **kwargs) -> list[dict[str, str]]:
        from pocketlm.tasks import summarize

        options = self._options(kwargs)
        texts = self._texts(documents)
        return [{"summary_text": summarize(self.generator, self.tokenizer, text, **options)} for text in texts]


class TranslationPipeline(InstructionPipeline):
    """`translator(text)` → `[{"translation_text": ...}]`, one dict per text. The languages come
    from the task name ("translation_en_to_fr") or `src_lang=` / `tgt_lang=` (codes such as "fr",
    or names), at creation or per call."""

    def __call__(self, inputs, **kwargs) -> list[dict[str, str]]:
        from pocketlm.tasks import translate

        options = self._options(kwargs)
        source, target = options.pop("src_lang", None), options.pop("tgt_lang", None)
        if target is None:
            raise ConfigError("translation needs the target language: pipeline('translation_en_to_fr', ...) or "
                              "tgt_lang='fr'")
        texts = self._texts(inputs)
        return [{"translation_text": translate(self.generator, self.tokenizer, text, target, source, **options)}
                for text in texts]


class QuestionAnsweringPipeline(InstructionPipeline):
    """`qa(question=..., context=...)` → `{"score", "start", "end", "answer"}` as transformers'
    question-answering: context[start:end] == answer when the answer is a span of the context
    (a sentence-long reply is narrowed to its span; start and end are None when there is none).
    The model writes the answer (pocketlm.tasks.answer_question), so `score` is the geometric
    mean of its reply's token probabilities. Also `qa({"question", "context"})`,
    `qa(question, context)` and lists of either (a list of results back). A context longer than
    the window is cut to the parts that match the question best."""

    def __call__(self, *args, **kwargs):
        from pocketlm.tasks import answer_question

        options = self._options(kwargs)
        question, context = options.pop("question", None), options.pop("context", None)
        if options.pop("top_k", 1) != 1:
            raise ConfigError("pocketlm's question answering writes one answer per question; drop top_k")
        if len(args) == 2:
            question, context = args
        elif len(args) == 1:
            pairs = args[0] if isinstance(args[0], list) else [args[0]]
            if not all(isinstance(p, dict) and {"question", "context"} <= set(p) for p in pairs):
                raise ConfigError("question-answering takes question= and context=, or dicts with 'question' and "
                                  "'context'")
            results = [answer_question(self.generator, self.tokenizer, p["question"], p["context"], **options)
                       for p in pairs]
            return results if isinstance(args[0], list) else results[0]
        elif args:
            raise ConfigError("question-answering takes at most two positional arguments: question and context")
        if question is None or context is None:
            raise ConfigError("question-answering needs both question= and context=")
        if isinstance(question, list):
            contexts = context if isinstance(context, list) else [context] * len(question)
            if len(contexts) != len(question):
                raise ConfigError(f"{len(question)} questions but {len(contexts)} contexts")
            return [answer_question(self.generator, self.tokenizer, q, c, **options)
                    for q, c in zip(question, contexts)]
        return answer_question(self.generator, self.tokenizer, question, context, **options)


class ChatPipeline(TextGenerationPipeline):
    """`chat(messages)` → `[{"generated_text": messages + [the assistant's reply]}]`: text
    generation on a conversation, through the model's chat template; a plain string is one user
    message."""

    def __call__(self, inputs, **kwargs) -> list:
        if isinstance(inputs, str):
            inputs = [{"role": "user", "content": inputs}]
        elif not _is_chat(inputs):
            raise ConfigError("chat takes a list of {'role', 'content'} messages (or one string as the user's message)")
        return super().__call__(inputs, **kwargs)


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)


_TASKS = {"text-classification": TextClassificationPipeline, "sentiment-analysis": TextClassificationPipeline,
          "text-generation": TextGenerationPipeline, "zero-shot-classification": ZeroShotClassificationPipeline,
          "feature-extraction": FeatureExtractionPipeline, "summarization": SummarizationPipeline,
          "translation": TranslationPipeline, "question-answering": QuestionAnsweringPipeline, "chat": ChatPipeline}
_TRANSLATION = re.compile(r"translation_([A-Za-z]{2})_to_([A-Za-z]{2})")
