"""Everyday transformers code, run twice: once on transformers, once on pocketlm with only the
import changed. Each call runs on tiny random GPT-2 and Llama checkpoints; the table shows which
calls work on both, whether their results agree, and any call that works on one library only.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/everyday_calls.py                      # print the table
    HF_HUB_OFFLINE=1 .venv/bin/python examples/everyday_calls.py --write docs/compatibility.md

Results are compared as numbers (tensors within 1e-4), ids, strings and shapes; sampling is
compared by shape only, since the two libraries draw from the RNG in different orders.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import types
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = ("Once upon a time there was a little model that wanted to learn to write stories. "
        "It read every book it could find, one token at a time.\n") * 40
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "user", "content": "Once upon a time?"}]


def libraries() -> dict[str, types.SimpleNamespace]:
    import transformers

    import pocketlm

    names = ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "GenerationConfig", "TextStreamer")
    return {"transformers": types.SimpleNamespace(**{n: getattr(transformers, n) for n in names}),
            "pocketlm": types.SimpleNamespace(**{n: getattr(pocketlm, n) for n in names})}


def make_checkpoints(folder: Path) -> dict[str, Path]:
    """Tiny random GPT-2 and Llama folders written by transformers, with a BPE tokenizer."""
    import transformers

    from pocketlm.tokenizer import Tokenizer

    text = folder / "text.txt"
    text.write_text(TEXT)
    tokenizer = Tokenizer.train([text], vocab_size=300,
                                special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = CHATML
    configs = {
        "gpt2": transformers.GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=4, n_embd=32, n_positions=128,
                                        bos_token_id=0, eos_token_id=0),
        "llama": transformers.LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, hidden_size=32, intermediate_size=64,
                                          max_position_embeddings=128, bos_token_id=0, eos_token_id=0),
    }
    out = {}
    for family, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)  # a peaked next-token distribution, so greedy is stable
        out[family] = folder / family
        model.save_pretrained(out[family])
        tokenizer.save_pretrained(out[family])
    return out


# --- the calls: each takes (lib, folder, scratch) and returns something comparable ---------------

def _load(lib, folder, **kw):
    return lib.AutoTokenizer.from_pretrained(folder), lib.AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def _ids(tok):
    return tok("Once upon a time there was", return_tensors="pt")


def tokenizer_calls():
    def pad_as_eos(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder)
        tok.pad_token = tok.eos_token
        return tok(["a", "longer text here"], padding=True, return_tensors="pt")

    def pad_id(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder)
        tok.pad_token_id = tok.eos_token_id
        return tok.pad_token

    def left_padding(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder, padding_side="left")
        tok.pad_token = tok.eos_token
        return tok(["a", "longer text here"], padding=True)

    def pad_method(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder)
        tok.pad_token = tok.eos_token
        return tok.pad([tok("a"), tok("longer text")], return_tensors="pt")

    def add_special(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder)
        n = tok.add_special_tokens({"pad_token": "<pad>"})
        return n, tok.pad_token, len(tok), tok("a <pad>")["input_ids"]

    def add_tokens(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder)
        return tok.add_tokens(["storyteller", "time"]), len(tok), tok("a storyteller")["input_ids"]

    def roundtrip(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder)
        tokens = tok.tokenize("Once upon a time")
        return tokens, tok.convert_tokens_to_string(tokens), tok.convert_tokens_to_ids(tokens)

    def chat(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder)
        return (tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True),
                tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt"))

    def chat_batch(lib, folder, _):
        tok = lib.AutoTokenizer.from_pretrained(folder)
        tok.pad_token = tok.eos_token
        return tok.apply_chat_template([CONVERSATION, CONVERSATION + [{"role": "assistant", "content": "Yes."}]],
                                       padding=True, return_dict=True, return_tensors="pt")

    return {
        "AutoTokenizer.from_pretrained(path, use_fast=True)": lambda lib, f, _: lib.AutoTokenizer.from_pretrained(
            f, use_fast=True)("Once upon a time")["input_ids"],
        "tokenizer(text)": lambda lib, f, _: lib.AutoTokenizer.from_pretrained(f)("Once upon a time"),
        "tokenizer.encode(text, return_tensors='pt')": lambda lib, f, _: lib.AutoTokenizer.from_pretrained(
            f).encode("Once upon a time", return_tensors="pt"),
        "tokenizer.decode(ids, skip_special_tokens=True)": lambda lib, f, _: (
            lambda t: t.decode(t("<|im_start|>Once upon<|endoftext|>")["input_ids"], skip_special_tokens=True))(
            lib.AutoTokenizer.from_pretrained(f)),
        "tokenizer.pad_token = tokenizer.eos_token; padding=True": pad_as_eos,
        "tokenizer.pad_token_id = ...": pad_id,
        "from_pretrained(path, padding_side='left')": left_padding,
        "tokenizer.pad([...])": pad_method,
        "tokenizer.add_special_tokens({'pad_token': ...})": add_special,
        "tokenizer.add_tokens([...])": add_tokens,
        "tokenize / convert_tokens_to_string / convert_tokens_to_ids": roundtrip,
        "tokenizer(text, text_pair)": lambda lib, f, _: lib.AutoTokenizer.from_pretrained(f)("Once upon", "a time"),
        "return_offsets_mapping=True, return_length=True": lambda lib, f, _: lib.AutoTokenizer.from_pretrained(f)(
            ["Once upon a time", "a"], return_offsets_mapping=True, return_length=True),
        "padding=True, pad_to_multiple_of=8": lambda lib, f, _: (lambda t: (
            setattr(t, "pad_token", t.eos_token), t(["a", "Once upon"], padding=True, pad_to_multiple_of=8))[1])(
            lib.AutoTokenizer.from_pretrained(f)),
        "truncation=True, max_length=4": lambda lib, f, _: lib.AutoTokenizer.from_pretrained(f)(
            "Once upon a time there was", truncation=True, max_length=4),
        "apply_chat_template (text; return_dict=True)": chat,
        "apply_chat_template(batch, padding=True)": chat_batch,
        "apply_chat_template(..., enable_thinking=False)": lambda lib, f, _: lib.AutoTokenizer.from_pretrained(
            f).apply_chat_template(CONVERSATION, tokenize=False, enable_thinking=False),
        "apply_chat_template(truncation=True, max_length=5)": lambda lib, f, _: lib.AutoTokenizer.from_pretrained(
            f).apply_chat_template(CONVERSATION, truncation=True, max_length=5, return_dict=True),
    }


def model_calls():
    def loop_with_cache(lib, folder, _):
        tok, model = _load(lib, folder)
        ids = _ids(tok)["input_ids"]
        with torch.no_grad():
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            step = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            full = model(torch.cat((ids, nxt), 1))
        return step.logits[:, -1], full.logits[:, -1]

    def generation_config_attr(lib, folder, _):
        tok, model = _load(lib, folder)
        model.generation_config.pad_token_id = tok.eos_token_id
        model.generation_config.max_new_tokens = 7
        return model.generate(**_ids(tok), do_sample=False)

    def transition_scores(lib, folder, _):
        tok, model = _load(lib, folder)
        out = model.generate(**_ids(tok), max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_scores=True)
        return out.sequences, model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)

    def beams(lib, folder, _):
        tok, model = _load(lib, folder)
        out = model.generate(**_ids(tok), max_new_tokens=6, num_beams=3, num_return_sequences=2,
                             do_sample=False, return_dict_in_generate=True, output_scores=True)
        return out.sequences, out.sequences_scores

    def resize(lib, folder, _):
        _, model = _load(lib, folder)
        model.resize_token_embeddings(model.config.vocab_size + 8)
        return model.get_input_embeddings().weight.shape, model.config.vocab_size

    def save_sharded(lib, folder, scratch):
        _, model = _load(lib, folder)
        target = scratch / f"{lib.name}-shards"
        model.save_pretrained(target, max_shard_size="200KB")
        return sorted(p.name for p in target.glob("*.safetensors*"))

    def save_not_safe(lib, folder, scratch):
        _, model = _load(lib, folder)
        target = scratch / f"{lib.name}-unsafe"
        model.save_pretrained(target, safe_serialization=False)
        reloaded = lib.AutoModelForCausalLM.from_pretrained(target)
        return sum(p.sum() for p in reloaded.parameters()).item()

    def streamed(skip_prompt):
        def call(lib, folder, _):
            tok, model = _load(lib, folder)

            class Collect(lib.TextStreamer):  # what TextStreamer would print, kept
                def on_finalized_text(self, text, stream_end=False):
                    self.parts = [*getattr(self, "parts", []), text]

            streamer = Collect(tok, skip_prompt=skip_prompt, skip_special_tokens=True)
            model.generate(**_ids(tok), max_new_tokens=10, do_sample=False, streamer=streamer,
                           pad_token_id=tok.eos_token_id)
            return "".join(streamer.parts)
        return call

    def gen(**kw):
        def call(lib, folder, _):
            tok, model = _load(lib, folder)
            return model.generate(**_ids(tok), pad_token_id=tok.eos_token_id, **kw)
        return call

    def forward(**kw):
        def call(lib, folder, _):
            tok, model = _load(lib, folder)
            with torch.no_grad():
                return model(**_ids(tok), **kw)
        return call

    return {
        "from_pretrained(path)": lambda lib, f, _: _load(lib, f)[1](**_ids(_load(lib, f)[0])).logits,
        "from_pretrained(device_map='auto', torch_dtype=torch.float32)": lambda lib, f, _: _load(
            lib, f, device_map="auto", torch_dtype=torch.float32)[1].dtype,
        "from_pretrained(dtype='auto', low_cpu_mem_usage=True)": lambda lib, f, _: _load(
            lib, f, dtype="auto", low_cpu_mem_usage=True)[1].dtype,
        "from_pretrained(local_files_only=True, trust_remote_code=False, revision='main')": lambda lib, f, _: _load(
            lib, f, local_files_only=True, trust_remote_code=False, revision="main")[1].num_parameters(),
        "from_pretrained(attn_implementation='eager')": lambda lib, f, _: _load(
            lib, f, attn_implementation="eager")[1](**_ids(_load(lib, f)[0])).logits,
        "model(**inputs, labels=ids).loss": lambda lib, f, _: (lambda t, m: m(
            **_ids(t), labels=_ids(t)["input_ids"]).loss)(*_load(lib, f)),
        "model(..., return_dict=False)[0]": lambda lib, f, _: forward(return_dict=False)(lib, f, _)[0],
        "model(..., output_hidden_states=True).hidden_states": lambda lib, f, _: forward(
            output_hidden_states=True)(lib, f, _).hidden_states,
        "from_pretrained(attn_implementation='eager'); model(..., output_attentions=True)": lambda lib, f, _:
            _attentions(lib, f),
        "past_key_values loop == full forward": loop_with_cache,
        "config.hidden_size, num_hidden_layers, max_position_embeddings, vocab_size": lambda lib, f, _: (
            lambda c: (c.hidden_size, c.num_hidden_layers, c.max_position_embeddings, c.vocab_size,
                       c.num_attention_heads))(_load(lib, f)[1].config),
        "AutoConfig.from_pretrained(path), then AutoModelForCausalLM.from_config(config)": lambda lib, f, _: (
            lambda c: (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.model_type,
                       lib.AutoModelForCausalLM.from_config(c).num_parameters()))(lib.AutoConfig.from_pretrained(f)),
        "num_parameters(), get_input_embeddings()": lambda lib, f, _: (
            lambda m: (m.num_parameters(), m.get_input_embeddings().weight.shape))(_load(lib, f)[1]),
        "resize_token_embeddings(n)": resize,
        "generate(**inputs) (default length)": gen(),
        "generate(max_new_tokens=8, do_sample=False)": gen(max_new_tokens=8, do_sample=False),
        "generate(max_length=40)": gen(max_length=40),
        "generate(min_new_tokens=6, max_new_tokens=8)": gen(min_new_tokens=6, max_new_tokens=8),
        "generate(no_repeat_ngram_size=2)": gen(max_new_tokens=12, no_repeat_ngram_size=2),
        "generate(repetition_penalty=1.3)": gen(max_new_tokens=8, repetition_penalty=1.3),
        "generate(generation_config=GenerationConfig(...))": lambda lib, f, _: (lambda t, m: m.generate(
            **_ids(t), generation_config=lib.GenerationConfig(max_new_tokens=5, do_sample=False,
                                                              pad_token_id=t.eos_token_id)))(*_load(lib, f)),
        "model.generation_config.pad_token_id = ...": generation_config_attr,
        "generate(return_dict_in_generate=True, output_scores=True) + compute_transition_scores": transition_scores,
        "generate(num_beams=3, num_return_sequences=2)": beams,
        "generate(do_sample=True, top_k=50, top_p=0.9, num_return_sequences=2) (shape)": lambda lib, f, _: tuple(
            gen(max_new_tokens=6, do_sample=True, top_k=50, top_p=0.9, num_return_sequences=2,
                min_new_tokens=6)(lib, f, _).shape),
        "generate(streamer=TextStreamer(tok))": streamed(skip_prompt=False),
        "generate(streamer=TextStreamer(tok, skip_prompt=True))": streamed(skip_prompt=True),
        "save_pretrained(max_shard_size='200KB')": save_sharded,
        "save_pretrained(safe_serialization=False) then reload": save_not_safe,
    }


def _attentions(lib, folder):
    tok = lib.AutoTokenizer.from_pretrained(folder)
    model = lib.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**_ids(tok), output_attentions=True).attentions


# --- running and comparing ------------------------------------------------------------------------

def comparable(x):
    """Plain Python values (tensors as float lists with their shape) for comparing."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.detach().double().flatten().tolist())
    if isinstance(x, torch.Size):
        return tuple(x)
    if isinstance(x, torch.dtype):
        return str(x)
    if hasattr(x, "keys") and hasattr(x, "__getitem__"):
        return {k: comparable(x[k]) for k in sorted(x.keys())}
    if isinstance(x, (list, tuple)):
        return [comparable(v) for v in x]
    if isinstance(x, float):
        return ("float", (), [x])
    return x


def agree(a, b, tol=1e-4) -> bool:
    if isinstance(a, tuple) and len(a) == 3 and a[0] in ("tensor", "float"):
        return (isinstance(b, tuple) and len(b) == 3 and b[0] == a[0] and a[1] == b[1]
                and all(abs(x - y) <= tol * (1 + abs(x)) for x, y in zip(a[2], b[2])))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(agree(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(agree(x, y, tol) for x, y in zip(a, b))
    return a == b


def run_all(folder: Path | None = None) -> list[dict]:
    """One row per call and checkpoint: what each library did and whether the results agree."""
    libs = libraries()
    for name, lib in libs.items():
        lib.name = name
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        checkpoints = make_checkpoints(scratch)
        calls = [("tokenizer", name, fn, checkpoints["gpt2"]) for name, fn in tokenizer_calls().items()]
        calls += [(family, name, fn, path) for family, path in checkpoints.items()
                  for name, fn in model_calls().items()]
        for family, name, fn, path in calls:
            results = {}
            for lib_name, lib in libs.items():
                try:
                    torch.manual_seed(0)
                    results[lib_name] = ("ok", comparable(fn(lib, path, scratch)))
                except Exception as e:  # the table reports it
                    results[lib_name] = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            theirs, ours = results["transformers"], results["pocketlm"]
            same = theirs[0] == ours[0] == "ok" and agree(theirs[1], ours[1])
            rows.append({"family": family, "call": name, "transformers": theirs[0], "pocketlm": ours[0],
                         "same": same, "errors": {k: v[1] for k, v in results.items() if v[0] == "error"}})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| checkpoint | call | transformers | pocketlm | same result |", "|---|---|---|---|---|"]
    for r in rows:
        same = "yes" if r["same"] else ("**no**" if r["transformers"] == r["pocketlm"] == "ok" else "—")
        lines.append(f"| {r['family']} | `{r['call']}` | {r['transformers']} | {r['pocketlm']} | {same} |")
    one_sided = [r for r in rows if r["transformers"] != r["pocketlm"]]
    lines += ["", "Calls that work on one library only:" if one_sided else
              "Every call works on both libraries."]
    for r in one_sided:
        lines.append(f"- {r['family']}: `{r['call']}` — {'; '.join(f'{k}: {v}' for k, v in r['errors'].items())}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="MD", help="replace the table in this markdown file")
    args = parser.parse_args()
    text = table(run_all())
    print(text)
    if args.write:
        path = Path(args.write)
        page = path.read_text()
        begin, end = "<!-- everyday-calls:begin -->", "<!-- everyday-calls:end -->"
        head, rest = page.split(begin)
        path.write_text(head + begin + "\n" + text + end + rest.split(end)[1])


if __name__ == "__main__":
    main()
