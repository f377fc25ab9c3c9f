"""Fine-tuning tasks for the Trainer: sequence classification on labelled examples, and chat
instruction tuning (SFT) on conversations — every weight, or LoRA adapters (and a classifier's
head) on a frozen base.

Both read their examples once, tokenize them, and feed the Trainer padded batches from seeded
epochs (ExampleBatches), so a resumed fine-tune continues exactly. Padding is on the right and
needs no attention mask: under causal attention no real token ever attends to a pad after it.
A classifier reads each row at its last token that is not the pad id; an SFT loss skips pads.

A fine-tune keeps the newest checkpoint (for --resume) and the best by its validation metric
(accuracy for classify, loss for sft), marked in RUN/best.json; the run folder loads as its best
checkpoint wherever a model goes. A LoRA checkpoint is an adapter folder (PEFT layout) that
records its base model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from pocketlm import registry
from pocketlm.config import FinetuneConfig
from pocketlm.data import DataError
from pocketlm.errors import ConfigError
from pocketlm.train import Task, contiguous

log = logging.getLogger(__name__)

IGNORE = -100  # a label the loss skips, as in transformers


class ExampleBatches:
    """Seeded epochs over examples: each epoch a fresh permutation (drawn from the seed and the
    epoch's number), read in order a global batch of batch_size × world_size at a time, of which
    this rank takes its rows. Batches run on across an epoch's end. The state is (epoch,
    position), so a resume continues with the very next example."""

    def __init__(self, examples: list, batch_size: int, seed: int, collate: Callable[[list], Any],
                 rank: int = 0, world_size: int = 1):
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.examples), generator=generator))
        return self._order[1]

    def next(self):
        chosen = []
        while len(chosen) < self.batch_size * self.world_size:
            if self.position == len(self.examples):
                self.epoch, self.position = self.epoch + 1, 0
            chosen.append(int(self.order(self.epoch)[self.position]))
            self.position += 1
        mine = chosen[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in mine])

    def state(self) -> torch.Tensor:
        return torch.tensor([self.epoch, self.position], dtype=torch.int64)

    def restore(self, state: torch.Tensor) -> None:
        self.epoch, self.position = (int(v) for v in state)


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def steps_for(config: FinetuneConfig, examples: int, world_size: int) -> FinetuneConfig:
    """The config with --max-steps settled: as given, or as many as --epochs take."""
    if config.max_steps:
        return config
    per_step = config.batch_size * config.grad_accum * world_size
    steps = max(1, math.ceil(config.epochs * examples / per_step))
    log.info("%g epoch(s) of %s training examples at %d a step: %d steps", config.epochs, f"{examples:,}",
             per_step, steps)
    return dataclasses.replace(config, max_steps=steps)


# --- what the two tasks share ---------------------------------------------------------------------

class FineTune(Task):
    """Loading the base (every weight trainable, or frozen under LoRA adapters), saving
    checkpoints (a whole model, or an adapter folder that names its base) and the examples."""

    model_class: type
    lora_task_type: str

    def __init__(self, config: FinetuneConfig, dist):
        self.config, self.dist = config, dist
        self.base = registry.resolve(config.model, unknown=f"--model {config.model!r} is not a checkpoint or run "
                                     "folder, a .gguf file or a pulled registry name")
        registry.check_out_apart_from(config.out, self.base)

    @property
    def base_name(self) -> str:
        """How an adapter records its base: the registry name as given, else the absolute path."""
        given = self.config.model
        if given in registry.MODELS and not Path(given).exists():
            return given
        return str(self.base.path.resolve())

    def load_base(self):
        raise NotImplementedError

    def build_model(self, trainer, resume_from: Path | None):
        c = self.config
        if resume_from is not None and not c.lora:
            model = self.model_class.from_pretrained(resume_from, dtype=torch.float32)
        else:
            from pocketlm.checkpoint import heads_supplied

            with heads_supplied():  # a new classifier head is what this run trains (or resumes)
                model = self.load_base()
            if c.lora:
                from pocketlm.lora import LoraConfig, apply_lora, load_adapter

                if resume_from is not None:
                    load_adapter(model, resume_from)
                else:
                    apply_lora(model, LoraConfig(r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout,
                                                 targets=_lora_targets(model, c.lora_targets),
                                                 task_type=self.lora_task_type))
        contiguous(model)
        trainer._check_memory(model.config, model.num_parameters(), weights_allocated=trainer.device.type == "cpu")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.dist.main:
            log.info("training %s of %s parameters (%.2f%%)", f"{trainable:,}", f"{model.num_parameters():,}",
                     100 * trainable / max(1, model.num_parameters()))
        return model

    def save(self, model, folder: Path) -> None:
        if getattr(model, "lora_config", None) is None:
            model.save_pretrained(folder, tokenizer=self.tokenizer)
            return
        from pocketlm.lora import save_adapter

        save_adapter(model, folder, base_model_name_or_path=self.base_name)
        self.tokenizer.save_pretrained(folder)

    def max_length(self, model) -> int:
        return min(self.config.block_size, model.config.max_position)

    def batches_over(self, examples: list, collate) -> ExampleBatches:
        return ExampleBatches(examples, self.config.batch_size, self.config.seed, collate,
                              self.dist.rank, self.dist.world_size)

    def val_rows(self, examples: list) -> list:
        """This rank's share of the validation examples."""
        return examples[self.dist.rank::self.dist.world_size]


def _lora_targets(model, spec: str) -> tuple[str, ...]:
    """--lora-targets as layer names; all-linear names every linear layer of the blocks."""
    from pocketlm.lora import layer_names

    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["all-linear"]:
        return tuple(layer_names(model))
    if not names:
        raise ConfigError("--lora-targets is empty: name layers (q_proj,v_proj) or pass all-linear")
    return tuple(names)


# --- classification ------------------------------------------------------------------------------

class Classification(FineTune):
    """A label per text: cross-entropy on the classifier's logits; evaluations report accuracy,
    macro-F1 and the confusion matrix, and the best checkpoint is the most accurate."""

    metrics = ("val_accuracy", "val_macro_f1", "val_confusion")
    best = "val_accuracy"
    lora_task_type = "SEQ_CLS"

    def __init__(self, config: FinetuneConfig, dist):
        from pocketlm.api import AutoTokenizer, SequenceClassification
        from pocketlm.labelled import load_labelled

        super().__init__(config, dist)
        self.model_class = SequenceClassification
        data = load_labelled(config.data, config.val or None, text_field=config.text_field,
                             label_field=config.label_field, labels=config.label_names, val_frac=config.val_frac,
                             seed=config.seed)
        self.labels = data.labels
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        index = {name: i for i, name in enumerate(self.labels)}
        # tokenized as the text-classification pipeline tokenizes at inference
        encode = lambda examples: [(ids, index[label]) for ids, (_, label) in  # noqa: E731
                                   zip(self.tokenizer([t for t, _ in examples])["input_ids"], examples)]
        self.texts = {"training": data.train, "validation": data.val}
        self.train, self.val = encode(data.train), encode(data.val)
        self.config = steps_for(config, len(self.train), dist.world_size)
        self.batches = self.batches_over(self.train, self._collate)

    def load_base(self):
        names = dict(enumerate(self.labels))
        return self.model_class.from_pretrained(
            self.base, dtype=torch.float32, id2label=names, label2id={n: i for i, n in names.items()},
            problem_type="single_label_classification")

    def check(self, trainer) -> None:
        config = trainer.model.config
        if config.id2label is None or [config.id2label[i] for i in range(len(config.id2label))] != self.labels:
            raise ConfigError(f"the checkpoint's labels ({config.id2label}) are not this run's ({self.labels}); "
                              "resume with the same --labels and data")
        self.pad = config.pad_token_id
        limit = self.max_length(trainer.model)
        for name, examples in (("training", self.train), ("validation", self.val)):
            self._fit(examples, limit, name)
        self.val = self.val_rows(self.val)

    def _fit(self, examples: list, limit: int, name: str) -> None:
        long = [i for i, (ids, _) in enumerate(examples) if len(ids) > limit]
        if long and not self.config.truncate:
            text = self.texts[name][long[0]][0]
            raise DataError(f"{len(long):,} {name} example(s) have more than {limit} tokens, the first: "
                            f"{text[:60]!r}{'...' if len(text) > 60 else ''} ({len(examples[long[0]][0])} tokens); "
                            "raise --block-size (up to the model's context), shorten them, or drop --no-truncate "
                            "to cut them")
        for i in long:
            examples[i] = (examples[i][0][:limit], examples[i][1])
        if long and self.dist.main:
            log.warning("cut %s of %s %s examples to %d tokens (--block-size; --no-truncate refuses them instead)",
                        f"{len(long):,}", f"{len(examples):,}", name, limit)

    def _collate(self, rows: list) -> dict[str, torch.Tensor]:
        return {"input_ids": pad_right([ids for ids, _ in rows], self.pad),
                "labels": torch.tensor([label for _, label in rows], dtype=torch.long)}

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        logits = model(batch["input_ids"]).logits
        tokens = int((batch["input_ids"] != self.pad).sum())
        return F.cross_entropy(logits.float(), batch["labels"]), tokens

    def evaluation_sums(self, model, autocast) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        k = len(self.labels)
        loss, confusion = torch.zeros((), dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
        for start in range(0, len(self.val), self.config.batch_size):
            batch = self._collate(self.val[start:start + self.config.batch_size])
            with autocast():
                logits = model(batch["input_ids"].to(device)).logits.float().cpu()
            loss += F.cross_entropy(logits, batch["labels"], reduction="sum").double()
            confusion.index_put_((batch["labels"], logits.argmax(-1)), torch.ones(len(logits), dtype=torch.float64),
                                 accumulate=True)
        return {"loss": loss, "count": torch.tensor(float(len(self.val)), dtype=torch.float64),
                "confusion": confusion}

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        from pocketlm.metrics import classification_metrics

        # the ranks' confusion matrices are added up: the pairs they count give the metrics
        pairs = [(g, p) for g, row in enumerate(sums["confusion"].long().tolist()) for p, n in enumerate(row)
                 for _ in range(n)]
        found = classification_metrics([g for g, _ in pairs], [p for _, p in pairs], len(self.labels))
        return {"val_loss": float(sums["loss"]) / max(float(sums["count"]), 1.0),
                "val_accuracy": found["accuracy"], "val_macro_f1": found["macro_f1"],
                "val_confusion": str(found["confusion"]).replace(" ", "")}

    def report(self, metrics: dict[str, Any]) -> list[str]:
        import json

        from pocketlm.metrics import format_metrics

        found = {"accuracy": metrics["val_accuracy"], "macro_f1": metrics["val_macro_f1"],
                 "confusion": json.loads(metrics["val_confusion"])}
        return format_metrics(found, self.labels).splitlines()[1:]  # (the summary line has the accuracy)


# --- chat instruction tuning ---------------------------------------------------------------------

class InstructionTuning(FineTune):
    """Conversations rendered through the base's chat template (ChatML when it has none, saved
    with the result); the loss is the mean −log p over assistant tokens only, end-of-turn
    included — never the system or user text."""

    best, best_is_highest = "val_loss", False
    lora_task_type = "CAUSAL_LM"

    def __init__(self, config: FinetuneConfig, dist):
        from pocketlm.api import AutoTokenizer, CausalLM
        from pocketlm.conversations import read_conversations, training_template

        super().__init__(config, dist)
        self.model_class = CausalLM
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.template = training_template(self.tokenizer)
        if self.tokenizer.chat_template is None:
            log.info("the base model has no chat template: training with ChatML, saved with the result")
            self.tokenizer.chat_template = self.template
        train = read_conversations(config.data)
        if config.val:
            val = read_conversations(config.val)
        else:
            cut = len(train) - min(max(1, round(len(train) * config.val_frac)), len(train) - 1)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed)).tolist()
            val, train = [train[i] for i in sorted(order[cut:])], [train[i] for i in sorted(order[:cut])]
            if not val or not train:
                raise DataError(f"{config.data} holds {len(train) + len(val)} conversation(s); training with a "
                                "held-out validation share needs at least two (or pass --val FILE)")
        self.conversations = {"training": train, "validation": val}
        self.config = steps_for(config, len(train), dist.world_size)
        self.train: list = []
        self.batches = self.batches_over(self.train, self._collate)

    def load_base(self):
        return self.model_class.from_pretrained(self.base, dtype=torch.float32)

    def check(self, trainer) -> None:
        from pocketlm.conversations import encode_conversation

        # any id pads: the loss skips pads and no real token attends to one after it
        self.pad = next((i for i in (trainer.model.config.pad_token_id, self.tokenizer.pad_token_id,
                                     self.tokenizer.eos_token_id) if i is not None), 0)
        limit = self.max_length(trainer.model)
        encoded = {}
        for name, conversations in self.conversations.items():
            rows, cut, dropped = [], 0, 0
            for conversation in conversations:
                e = encode_conversation(self.tokenizer, conversation.messages, self.template, None)
                if len(e.input_ids) > limit:
                    if not self.config.truncate:
                        raise DataError(f"{conversation.where}: the conversation has {len(e.input_ids)} tokens, more "
                                        f"than {limit} (--block-size, at most the model's context); shorten it or "
                                        "drop --no-truncate to cut it")
                    e = dataclasses.replace(e, input_ids=e.input_ids[:limit], labels=e.labels[:limit])
                    cut += 1
                if all(label == IGNORE for label in e.labels[1:]):
                    dropped += 1  # its answer was cut away entirely: nothing to learn from it
                    continue
                rows.append((e.input_ids, e.labels))
            if (cut or dropped) and self.dist.main:
                log.warning("cut %s of %s %s conversations to %d tokens (--block-size), %s of them left without "
                            "any answer and skipped", f"{cut:,}", f"{len(conversations):,}", name, limit, dropped)
            if not rows:
                raise DataError(f"no {name} conversation keeps an assistant answer within {limit} tokens; "
                                "raise --block-size")
            encoded[name] = rows
        self.train[:] = encoded["training"]
        self.val = self.val_rows(encoded["validation"])

    def _collate(self, rows: list) -> dict[str, torch.Tensor]:
        return {"input_ids": pad_right([ids for ids, _ in rows], self.pad),
                "labels": pad_right([labels for _, labels in rows], IGNORE)}

    def _loss_sum(self, model, batch) -> tuple[torch.Tensor, int]:
        logits = model(batch["input_ids"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss, int((targets != IGNORE).sum())

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        total, count = self._loss_sum(model, batch)
        return total / max(count, 1), int((batch["input_ids"] != self.pad).sum())

    def evaluation_sums(self, model, autocast) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        total, count = torch.zeros((), dtype=torch.float64), 0
        for start in range(0, len(self.val), self.config.batch_size):
            batch = {k: v.to(device) for k, v in self._collate(self.val[start:start + self.config.batch_size]).items()}
            with autocast():
                loss, n = self._loss_sum(model, batch)
            total += float(loss)
            count += n
        return {"loss": total, "count": torch.tensor(float(count), dtype=torch.float64)}


TASKS = {"classify": Classification, "sft": InstructionTuning}
