"""Zero-shot classification with a causal LM: ask the model, score each label as the answer.

For each text the instruction is filled in (`{text}`, and `{labels}` with the label names) and
each label's log-likelihood as the continuation is the sum of log p(token | everything before)
over the label's tokens. The scores are the softmax of those sums over the labels.

    clf = ZeroShotClassifier(model, tokenizer, ["positive", "negative"])
    clf.predict(["a gripping, beautifully acted film"])  # ["positive"]

Two prompt forms. Plain, the default: the filled instruction, then the label with a leading space
("Label:" → " positive"). Chat (`chat=True`, for a tokenizer with a chat template): the filled
instruction (its trailing "Label:" line dropped) as the user's message, the label as the start of
the assistant's answer. Plain is the default because it was the more accurate: on 400 texts of
the held-out sentiment test split SmolLM2-135M-Instruct scored 71% plain (68% on all 2,113), and
54% in the chat form, where it answered "positive" to every text (docs/cli.md has the figures).

Calibrated by default (`calibrate=True`): a small model leans towards some labels whatever the
text — towards the label named last in the instruction, say — so each label's log-likelihood for
a text is measured against its mean over content-free texts ("N/A", "", "[MASK]"), as contextual
calibration does. On 300 texts of the test split this took SmolLM2-135M-Instruct from 49% or 71%
(the labels listed as "negative, positive" or "positive, negative") to 66% or 69%: much less
dependent on how the prompt happens to be worded. `calibrate=False` scores the raw likelihoods.

A label's tokens are those the tokenizer gives for prompt + label beyond the prompt's own tokens
(the label tokenized alone when a merge crosses the boundary), so the model reads the label as it
would read it in running text.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from pocketlm.errors import ConfigError, ContextLengthError

DEFAULT_INSTRUCTION = "Classify the text as one of: {labels}.\nText: {text}\nLabel:"
CONTENT_FREE = ("N/A", "", "[MASK]")  # texts that say nothing, for calibration
_FIELD = re.compile(r"\{(text|labels)\}")


class ZeroShotClassifier:
    """Label texts with a causal LM (model and tokenizer as pocketlm loads them) by the
    likelihood of each label after `instruction`, a template holding `{text}` (and optionally
    `{labels}`, filled with the names joined by ", "). `chat=True` asks through the tokenizer's
    chat template instead of plain text (see the module docstring)."""

    def __init__(self, model, tokenizer, labels: Sequence[str], instruction: str | None = None,
                 chat: bool = False, calibrate: bool = True):
        labels = list(labels)
        if not labels or not all(isinstance(label, str) and label.strip() for label in labels) \
                or len(set(labels)) != len(labels):
            raise ConfigError(f"zero-shot classification needs distinct, non-empty label names, got {labels!r}")
        if getattr(model, "get_output_embeddings", lambda: None)() is None:
            raise ConfigError("zero-shot classification asks a causal LM for the next tokens; this model has no "
                              "language-model head (a sequence classifier has its own labels: use it directly)")
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        if "{text}" not in instruction:
            raise ConfigError(f"the instruction {instruction!r} has no {{text}} field to put each text in")
        if chat and tokenizer.chat_template is None:
            raise ConfigError("chat=True needs a tokenizer with a chat template; this one has none (use chat=False)")
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        self.instruction, self.chat, self.calibrate = instruction, chat, calibrate
        self._bias: torch.Tensor | None = None

    def prompt(self, text: str) -> str:
        """The prompt text for `text`, as the model reads it before the label."""
        filled = _FIELD.sub(lambda m: text if m[1] == "text" else ", ".join(self.labels), self.instruction)
        if not self.chat:
            return filled
        # the answer itself plays the "Label:" line's part
        question = re.sub(r"\n\s*Label:\s*$", "", filled)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                  add_generation_prompt=True, tokenize=False)

    def continuation(self, label: str) -> str:
        return label if self.chat else " " + label

    @torch.no_grad()
    def log_likelihoods(self, texts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """(N, num_labels): log p(label | prompt), summed over each label's tokens, in float32."""
        if isinstance(texts, str):
            raise ConfigError("pass a list of texts (a single string would be read letter by letter)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        texts = list(texts)
        parts = [self._batch(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, len(self.labels))

    def logits(self, texts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """(N, num_labels): the log-likelihoods, less their content-free means when calibrating."""
        found = self.log_likelihoods(texts, batch_size)
        if not self.calibrate:
            return found
        if self._bias is None:
            self._bias = self.log_likelihoods(CONTENT_FREE, len(CONTENT_FREE)).mean(0)
        return found - self._bias

    def scores(self, texts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """(N, num_labels): each text's label probabilities (a softmax over `logits`)."""
        return self.logits(texts, batch_size).softmax(-1)

    def predict(self, texts: Sequence[str], batch_size: int = 8) -> list[str]:
        """The most likely label of each text."""
        return [self.labels[i] for i in self.logits(texts, batch_size).argmax(-1).tolist()]

    def _tokens(self, text: str) -> tuple[list[int], list[list[int]]]:
        """The prompt's token ids and each label's token ids after it."""
        encode = lambda s: self.tokenizer.encode(s, add_special_tokens=not self.chat)  # noqa: E731
        prompt = self.prompt(text)
        ids = encode(prompt)
        labels = []
        for label in self.labels:
            joint = encode(prompt + self.continuation(label))
            if joint[:len(ids)] == ids and len(joint) > len(ids):
                labels.append(joint[len(ids):])
            else:  # a merge across the boundary (or an end token added): the label on its own
                labels.append(self.tokenizer.encode(self.continuation(label), add_special_tokens=False))
            if not labels[-1]:
                raise ConfigError(f"label {label!r} encodes to no tokens; give it a name the tokenizer can spell")
        return ids, labels

    def _check_fits(self, length: int, text: str) -> None:
        window = self.model.config.max_position
        if length > window:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise ContextLengthError(f"the text {shown!r} with its prompt and label needs {length} positions, beyond "
                                     f"the model's context window of {window} tokens; shorten the text")

    def _batch(self, texts: list[str]) -> torch.Tensor:
        # One row per text and distinct label head: the row is the prompt plus the label's tokens
        # but its last (whose probability is read at the position before it). Labels of one token
        # all share the prompt's row, so two-way sentiment costs one forward per text.
        rows: list[list[int]] = []
        reads: list[tuple[int, int, int, int]] = []  # (row, position, label token, which text × label)
        for t, text in enumerate(texts):
            prompt, labels = self._tokens(text)
            if not prompt:
                raise ConfigError("the prompt encodes to no tokens, so nothing comes before the label; give an "
                                  "instruction with words around {text}")
            row_of: dict[tuple[int, ...], int] = {}
            for j, ids in enumerate(labels):
                head = tuple(ids[:-1])
                if head not in row_of:
                    row_of[head] = len(rows)
                    rows.append(prompt + list(head))
                    self._check_fits(len(rows[-1]), text)
                pair = t * len(labels) + j
                reads += [(row_of[head], len(prompt) - 1 + k, token, pair) for k, token in enumerate(ids)]
        longest = max(map(len, rows))
        device = self.model.device
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        # right padding needs no attention mask: a causal model's real tokens never see what follows them
        hidden = self.model.final_hidden_states(ids.to(device))[0]
        row, position, target, pair = (torch.tensor(column, device=device) for column in zip(*reads))
        logprobs = self.model.lm_head(hidden[row, position]).float().log_softmax(-1)
        picked = logprobs.gather(-1, target[:, None])[:, 0]
        sums = torch.zeros(len(texts) * len(self.labels), device=device).index_add_(0, pair, picked)
        return sums.view(len(texts), len(self.labels)).cpu()
