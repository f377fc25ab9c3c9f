"""The classic GPT-2 snippet, unchanged except the import line, on a model trained here.

    python examples/gpt2_snippet.py runs/demo          # a run folder (its newest checkpoint) or a checkpoint
"""

import sys

from pocketlm import GPT2LMHeadModel, GPT2Tokenizer

path = sys.argv[1] if len(sys.argv) > 1 else "runs/demo"
tokenizer = GPT2Tokenizer.from_pretrained(path)
model = GPT2LMHeadModel.from_pretrained(path)
input_ids = tokenizer.encode("ROMEO.\n", return_tensors="pt")
out = model.generate(input_ids, max_length=100, num_return_sequences=1, temperature=0.7)
print(tokenizer.decode(out[0], skip_special_tokens=True))
