"""The `pocketlm` command: a thin layer of verbs over the Python API.

Every PocketLMError becomes one line on stderr and exit code 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pocketlm import __version__
from pocketlm.errors import PocketLMError


def cmd_info(args) -> int:
    from pocketlm import checkpoint
    from pocketlm.tokenizer import Tokenizer

    model = checkpoint.load_pretrained(args.path, dtype="auto")
    c = model.config
    folder = checkpoint.resolve_folder(args.path)
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        tokenizer = Tokenizer.from_pretrained(folder)
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
        ("dtype", str(model.dtype).removeprefix("torch.")),
    ]
    if tokenizer is not None and tokenizer.chat_template:
        rows.append(("chat template", "yes"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_train_tokenizer(args) -> int:
    from pocketlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(args.files, vocab_size=args.vocab_size,
                                special_tokens=tuple(args.special_tokens), eos_token=args.special_tokens[0],
                                show_progress=sys.stderr.isatty())
    tokenizer.save_pretrained(args.out)
    print(f"trained a byte-level BPE tokenizer with {len(tokenizer):,} tokens → {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm", description="Train, load and run language models on your own machine.")
    parser.add_argument("--version", action="version", version=f"pocketlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="describe a checkpoint: architecture, parameters, vocabulary, context")
    p.add_argument("path", help="checkpoint folder (config.json + model.safetensors)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text files")
    p.add_argument("files", nargs="+", help="plain-text training files")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default: 4096)")
    p.add_argument("--special-tokens", nargs="+", default=["<|endoftext|>"],
                   help="special tokens; the first is end-of-text (default: <|endoftext|>)")
    p.add_argument("--out", required=True, help="folder to write tokenizer.json and its config into")
    p.set_defaults(func=cmd_train_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except PocketLMError as e:
        if args.debug:
            raise
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pocketlm: interrupted", file=sys.stderr)
        return 130
