"""Measure how closely pocketlm matches transformers on tiny random configs of both families
(fp32): logits, loss, KV-cache decode vs full forward, and greedy tokens. Prints a markdown table.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/parity.py
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import TINY, randomize  # noqa: E402  (the same tiny configs the tests use)

from pocketlm.api import CausalLM  # noqa: E402
from pocketlm.config import ModelConfig  # noqa: E402


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model = randomize(CausalLM.from_config(ModelConfig(**TINY[name]))).eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        back = CausalLM.from_pretrained(folder)
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    with torch.no_grad():
        ours, theirs = model(ids, labels=ids), hf(ids, labels=ids)
        cache = model.new_cache(4, 64)
        stepped = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(64)], dim=1)
        greedy = model.generate(ids[:, :8], do_sample=False, max_new_tokens=20)
        hf_greedy = hf.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), do_sample=False,
                                max_new_tokens=20, pad_token_id=0)
        reloaded = back(ids).logits
    return {
        "config": name,
        "logits max abs diff": (ours.logits - theirs.logits).abs().max().item(),
        "loss abs diff": abs(ours.loss.item() - theirs.loss.item()),
        "KV cache vs full, max abs diff": (stepped - ours.logits).abs().max().item(),
        "save+load max abs diff": (reloaded - ours.logits).abs().max().item(),
        "greedy 20 tokens equal": bool(torch.equal(greedy, hf_greedy)),
    }


def main():
    rows = [measure(name) for name in sorted(TINY)]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.2e}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
