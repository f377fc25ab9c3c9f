"""Fine-tuning on the one Trainer (issue 11): a tiny model learns a separable classification task
and answers the questions it was instruction-tuned on; LoRA trains only adapters (and the head);
best and newest checkpoints; resume as exact as pretraining's; bad input refused up front."""

import csv
import dataclasses
import json
import random

import pytest
import torch

from conftest import TINY
from pocketlm import ModelConfig, registry
from pocketlm.api import AutoModelForSequenceClassification, AutoTokenizer, CausalLM
from pocketlm.checkpoint import complete_checkpoints
from pocketlm.cli import main
from pocketlm.config import FinetuneConfig
from pocketlm.errors import ConfigError, PocketLMError
from pocketlm.tokenizer import Tokenizer
from pocketlm.train import Trainer

POSITIVE, NEGATIVE = ["good", "great", "lovely", "superb"], ["bad", "awful", "dull", "poor"]
FILLER = "the a film was very quite plot acting story and it".split()
QUESTIONS = [("What is the capital of France?", "Paris."), ("What color is the sky?", "Blue."),
             ("How many legs has a cat?", "Four."), ("What do bees make?", "Honey."),
             ("What is two plus two?", "Four."), ("Who wrote Hamlet?", "Shakespeare."),
             ("What is frozen water?", "Ice."), ("What planet do we live on?", "Earth."),
             ("What do cows drink?", "Water."), ("What is the opposite of hot?", "Cold."),
             ("What falls from clouds?", "Rain."), ("What do we breathe?", "Air."),
             ("What shines at night?", "The moon."), ("What is a baby dog?", "A puppy."),
             ("What do fish swim in?", "Water."), ("What colour is grass?", "Green."),
             ("How many days are in a week?", "Seven."), ("What do you read?", "Books."),
             ("What is the largest ocean?", "The Pacific."), ("What gives us light by day?", "The sun.")]


def _reviews(count: int, seed: int = 0) -> list[dict]:
    """Short 'reviews' whose label is told by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["positive", "negative"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny untrained Llama-family causal LM with a BPE tokenizer that knows the test texts."""
    folder = tmp_path_factory.mktemp("base")
    chat = "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in QUESTIONS)
    texts = [r["text"] for r in _reviews(300)] + [chat] * 20
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=400)
    config = ModelConfig(**{**TINY["llama-gqa-tied"], "n_embd": 64, "head_dim": 16, "intermediate_size": 128,
                            "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                            "max_position": 256})
    torch.manual_seed(0)
    CausalLM.from_config(config).save_pretrained(folder, tokenizer=tokenizer)
    return folder


def _classify(base, tmp_path, **settings) -> FinetuneConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = _write_jsonl(tmp_path / "train.jsonl", _reviews(300))
    values = dict(task="classify", data=str(train), model=str(base), out=str(tmp_path / "run"), lr=3e-3,
                  epochs=2, eval_every=25, threads=1)
    return FinetuneConfig(**{**values, **settings})


def _metrics(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- classification -------------------------------------------------------------------------------

def test_a_tiny_model_learns_a_separable_task_and_the_run_loads_as_its_best(base, tmp_path):
    config = _classify(base, tmp_path)
    trainer = Trainer(config)
    assert trainer.config.max_steps == 2 * 270 // 8 + 1  # two epochs of the 270 not held out, 8 a step
    last = trainer.fit()
    assert last["val_accuracy"] >= 0.95
    rows = [r for r in _metrics(tmp_path / "run") if r["val_accuracy"]]
    assert {"val_accuracy", "val_macro_f1", "val_confusion"} <= rows[0].keys()
    confusion = json.loads(rows[-1]["val_confusion"])
    assert sum(map(sum, confusion)) == 30 and sum(confusion[i][i] for i in range(2)) / 30 == last["val_accuracy"]

    best = json.loads((tmp_path / "run" / "best.json").read_text())
    accuracies = {int(r["step"]): float(r["val_accuracy"]) for r in rows}
    assert best["value"] == max(accuracies.values()) and best["step"] == min(
        s for s, a in accuracies.items() if a == best["value"])  # the first of the most accurate
    kept = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert {p.name for p in kept} == {best["checkpoint"], f"step-{trainer.config.max_steps:07d}"}

    # the run folder loads as its best checkpoint, with the training file's label names
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    from pocketlm import pipeline

    classify = pipeline("sentiment-analysis", model=str(tmp_path / "run"))
    held_out = _reviews(40, seed=7)
    answers = classify([r["text"] for r in held_out], batch_size=8)
    assert sum(a["label"] == r["label"] for a, r in zip(answers, held_out)) >= 36


def test_lora_trains_only_the_adapters_and_the_head(base, tmp_path):
    from pocketlm.lora import ADAPTER_CONFIG

    trainer = Trainer(_classify(base, tmp_path, lora=True, lr=1e-2, max_steps=30, eval_every=30))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_A." in n or ".lora_B." in n or n == "score.weight" for n in changed)
    assert any(".lora_B." in n for n in changed) and "score.weight" in changed
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    adapter = json.loads((saved / ADAPTER_CONFIG).read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}  # all-linear
    assert adapter["base_model_name_or_path"] == str(base.resolve())
    assert not (saved / "model.safetensors").exists()  # the adapter alone

    # the run folder loads as the base with its best adapter: the trained model's own answers
    from pocketlm import pipeline

    texts = [r["text"] for r in _reviews(24, seed=3)]
    classify = pipeline("sentiment-analysis", model=str(tmp_path / "run"))
    best = tmp_path / "run" / "checkpoints" / json.loads((tmp_path / "run" / "best.json").read_text())["checkpoint"]
    assert best == saved
    trainer.model.eval()
    with torch.no_grad():
        expected = [trainer.model.config.id2label[int(trainer.model(torch.tensor([ids])).logits.argmax())]
                    for ids in trainer.tokenizer(texts)["input_ids"]]
    assert [a["label"] for a in classify(texts)] == expected


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_continues_exactly(base, tmp_path, lora):
    settings = dict(lora=lora, lora_dropout=0.1, max_steps=12, eval_every=4, log_every=1, keep_last=3)
    whole = Trainer(_classify(base, tmp_path / "whole", **settings))
    whole.fit()
    Trainer(_classify(base, tmp_path / "cut", **{**settings, "max_steps": 4})).fit()  # stops at step 4...
    resumed = Trainer(_classify(base, tmp_path / "cut", **settings, resume=True))  # ...and goes on to 12
    assert resumed.step == 4
    resumed.fit()
    losses = lambda run: [(r["step"], r["train_loss"], r["val_loss"]) for r in _metrics(run / "run")]  # noqa: E731
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_bad_settings_and_data_are_refused_before_training(base, tmp_path):
    with pytest.raises(ConfigError, match="overlaps the base model's folder"):
        Trainer(_classify(base, tmp_path, out=str(base / "run")))
    assert not (base / "run").exists()
    with pytest.raises(ConfigError, match=r"match no layer.*q_proj"):
        Trainer(_classify(base, tmp_path, lora=True, lora_targets="c_attn"))
    with pytest.raises(PocketLMError, match="more than 5 tokens.*--no-truncate"):
        Trainer(_classify(base, tmp_path, block_size=5, truncate=False))
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "so so", "label": "neutral"}])
    with pytest.raises(PocketLMError, match=r"val.jsonl:1: label 'neutral' appears only in validation"):
        Trainer(_classify(base, tmp_path, val=str(val)))
    with pytest.raises(ConfigError, match="--epochs must be a finite number > 0"):
        Trainer(_classify(base, tmp_path, epochs=0))
    assert not (tmp_path / "run").exists()  # nothing was left behind


def test_long_examples_are_cut_and_counted(base, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        trainer = Trainer(_classify(base, tmp_path, block_size=6, max_steps=1))
    assert "--block-size" in caplog.text and "examples to 6 tokens" in caplog.text
    assert max(len(ids) for ids, _ in trainer.task.train) == 6


# --- chat instruction tuning ----------------------------------------------------------------------

def test_sft_teaches_a_tiny_model_to_answer_its_questions(base, tmp_path):
    from pocketlm.generate import Generator

    data = _write_jsonl(tmp_path / "qa.jsonl", [_conversation(q, a) for q, a in QUESTIONS])
    config = FinetuneConfig(task="sft", data=str(data), val=str(data), model=str(base), out=str(tmp_path / "run"),
                            lr=5e-3, max_steps=240, batch_size=10, eval_every=80, threads=1)
    trainer = Trainer(config)
    # the loss covers the answers and their end-of-turn marks only
    ids, labels = trainer.task.train[0]
    answer = trainer.tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert answer in {f"{a}<|im_end|>" for _, a in QUESTIONS}
    trainer.fit()

    model = CausalLM.from_pretrained(tmp_path / "run").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert tokenizer.chat_template  # ChatML, saved with the result
    from pocketlm.chat import ChatSession

    right = 0
    for question, answer in QUESTIONS:
        session = ChatSession(tokenizer, model.config.max_position)
        session.add("user", question)
        prompt = tokenizer.encode(session.render(), add_special_tokens=False)
        done = Generator(model, tokenizer).generate(prompt, max_new_tokens=12, stop=session.stop, do_sample=False)
        right += done.text.strip() == answer
    assert right >= 18, right

    # the result loads in transformers with its template: the same prompt, the same logits
    import transformers

    best = registry.resolve(tmp_path / "run").path
    theirs = transformers.AutoTokenizer.from_pretrained(best)
    messages = [{"role": "user", "content": QUESTIONS[0][0]}]
    prompt = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(best).eval()(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)


# --- the command line -----------------------------------------------------------------------------

def test_finetune_classify_command_reports_the_best_checkpoint(base, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.csv.jsonl", _reviews(120))
    code = main(["finetune", "classify", "--model", str(base), "--train", str(train), "--out", str(tmp_path / "run"),
                 "--max-steps", "6", "--eval-every", "3", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "confusion matrix" in out and "validation accuracy" in out and "best accuracy" in out
    assert f"pocketlm classify {tmp_path / 'run'}" in out


def test_finetune_command_errors_name_flags(base, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _reviews(20))
    assert main(["finetune", "classify", "--model", str(base), "--train", str(train), "--out", str(tmp_path / "r"),
                 "--epochs", "2", "--max-steps", "3"]) == 2
    assert "pass --epochs or --max-steps, not both" in capsys.readouterr().err
    assert main(["finetune", "sft", "--model", str(base), "--data", str(train), "--out", str(tmp_path / "r"),
                 "--lora-r", "0"]) == 2
    assert "--lora-r must be an integer ≥ 1" in capsys.readouterr().err
