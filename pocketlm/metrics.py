"""Classification metrics: accuracy, macro-F1 and the confusion matrix, from label ids.

Shared by the fine-tuning Trainer's evaluations and `pocketlm classify`, so both report the same
figures the same way.
"""

from __future__ import annotations

from typing import Sequence

from pocketlm.errors import ConfigError


def classification_metrics(gold: Sequence[int], predicted: Sequence[int], num_labels: int) -> dict:
    """{"accuracy", "macro_f1", "confusion"} for label ids in 0..num_labels-1. `confusion` is a
    list of num_labels rows (gold label) of num_labels counts (predicted label). Macro-F1 is the
    mean F1 over the labels that occur in `gold` or `predicted` (a label in neither has no F1 to
    speak of), as scikit-learn's f1_score(average="macro") computes it; a label predicted but never
    right, or never predicted, counts with F1 0."""
    gold, predicted = list(gold), list(predicted)
    if len(gold) != len(predicted):
        raise ConfigError(f"{len(gold)} gold labels but {len(predicted)} predictions; they must pair up")
    if not gold:
        raise ConfigError("no examples to score")
    for name, ids in (("gold", gold), ("predicted", predicted)):
        bad = next((i for i in ids if not 0 <= i < num_labels), None)
        if bad is not None:
            raise ConfigError(f"{name} label id {bad} is outside 0..{num_labels - 1}")
    confusion = [[0] * num_labels for _ in range(num_labels)]
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    f1s = []
    for label in range(num_labels):
        right = confusion[label][label]
        gold_count = sum(confusion[label])
        predicted_count = sum(row[label] for row in confusion)
        if gold_count or predicted_count:
            # F1 = 2·precision·recall / (precision + recall) = 2·TP / (gold + predicted)
            f1s.append(2 * right / (gold_count + predicted_count))
    accuracy = sum(confusion[i][i] for i in range(num_labels)) / len(gold)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s), "confusion": confusion}


def format_metrics(metrics: dict, labels: Sequence[str]) -> str:
    """The metrics as a few lines of text: accuracy and macro-F1, then the confusion matrix with
    the label names (rows: gold label, columns: predicted)."""
    confusion = metrics["confusion"]
    total = sum(map(sum, confusion))
    right = sum(confusion[i][i] for i in range(len(confusion)))
    width = max(max(map(len, labels)), max(len(str(n)) for row in confusion for n in row))
    lines = [f"accuracy {metrics['accuracy']:.4f} ({right}/{total}), macro-F1 {metrics['macro_f1']:.4f}",
             "confusion matrix (rows: gold label, columns: predicted):",
             " " * width + "".join(f"  {name:>{width}}" for name in labels)]
    lines += [f"{name:>{width}}" + "".join(f"  {n:>{width}}" for n in row) for name, row in zip(labels, confusion)]
    return "\n".join(lines)
