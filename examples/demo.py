"""The whole pipeline in one page: train a tokenizer on a text, pretrain a baby Transformer on it
by maximum likelihood for a few hundred steps, save a Hugging Face-style checkpoint, then load it
back with the classic GPT-2 snippet and generate.

    python examples/demo.py --text data/shakespeare.txt --out runs/demo
"""

import argparse
import math
import time

import torch

from pocketlm import ModelConfig, Tokenizer
from pocketlm.api import AutoModelForCausalLM, GPT2LMHeadModel, GPT2Tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="plain-text training corpus")
    parser.add_argument("--out", default="runs/demo", help="checkpoint folder to write")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    # 1. subword tokenizer: byte-level BPE learned from the corpus
    t0 = time.time()
    tokenizer = Tokenizer.train([args.text], vocab_size=args.vocab_size,
                                special_tokens=("<|endoftext|>",), eos_token="<|endoftext|>")
    text = open(args.text, encoding="utf-8").read()
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    ids = torch.tensor([t for row in tokenizer(chunks, add_special_tokens=False)["input_ids"] for t in row])
    print(f"tokenizer: {len(tokenizer)} tokens; corpus: {len(text):,} characters → {len(ids):,} tokens "
          f"({len(text) / len(ids):.2f} chars/token) in {time.time() - t0:.1f}s")
    split = int(0.95 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]

    # 2. a baby Llama-style model sized for a CPU
    config = ModelConfig.preset("baby", vocab_size=len(tokenizer), max_position=args.block_size,
                                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    print(f"model: {model.num_parameters():,} parameters, {config.n_layer} layers, width {config.n_embd}")

    def batch(source):
        starts = torch.randint(0, len(source) - args.block_size - 1, (args.batch_size,))
        return torch.stack([source[s:s + args.block_size] for s in starts.tolist()])

    @torch.no_grad()
    def val_loss():
        model.eval()
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, len(val_ids) - args.block_size - 1, (32,), generator=g)
        x = torch.stack([val_ids[s:s + args.block_size] for s in starts.tolist()])
        loss = model(x, labels=x).loss.item()
        model.train()
        return loss

    # 3. pretraining: minimise the mean -log p(next token | previous tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 10)

    def lr_factor(step):  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    print(f"step 0: validation loss {val_loss():.3f} (uniform guess: {math.log(len(tokenizer)):.3f})")
    model.train()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = batch(train_ids)
        loss = model(x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: train loss {loss.item():.3f}, validation loss {val_loss():.3f}, "
                  f"{step * args.batch_size * args.block_size / (time.time() - t0):,.0f} tokens/s")
    model.eval()
    model.save_pretrained(args.out, tokenizer=tokenizer)
    print(f"saved checkpoint → {args.out}")

    # 4. the classic snippet, unchanged except the import line
    tokenizer = GPT2Tokenizer.from_pretrained(args.out)
    model = GPT2LMHeadModel.from_pretrained(args.out)
    input_ids = tokenizer.encode("ROMEO.\n", return_tensors="pt")
    out = model.generate(input_ids, max_length=100, num_return_sequences=1, temperature=0.7)
    print("-" * 60)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    print("-" * 60)


if __name__ == "__main__":
    main()
