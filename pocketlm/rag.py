"""Answers grounded in your documents: retrieve the chunks that bear on a question (from an index,
or from a context file too long for the model's window), hand them to a chat model as numbered
sources, and print its answer with the sources it was given (file and line range).

    pocketlm ask --index my-index "Where is the spare car key?"
    pocketlm ask --context report.txt "What did the audit find?"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.search import Chunk, Hit, Index, chunk_lines

SYSTEM = ("Answer the question using only the numbered sources. Cite the sources you use by number, like [1]. "
          "If the sources do not hold the answer, say that you do not know.")
ANSWER_TOKENS = 128


@dataclass
class Answer:
    text: str
    sources: list[Chunk]


def sources_prompt(question: str, chunks: list[Chunk]) -> str:
    numbered = "\n\n".join(f"[{i}] ({c.source}, lines {c.start_line}-{c.end_line})\n{c.text}"
                           for i, c in enumerate(chunks, 1))
    return f"Sources:\n\n{numbered}\n\nQuestion: {question}"


def context_chunks(text: str, question: str, tokenizer, budget: int, source: str = "context") -> list[Chunk]:
    """The whole context as one source when it fits `budget` tokens; otherwise its chunks ranked by
    BM25 against the question, as many of the best as fit, back in document order."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError("the context is empty")

    def count(t):
        return len(tokenizer.encode(t, add_special_tokens=False))
    whole = Chunk("\n".join(t for _, t in lines), source, lines[0][0], lines[-1][0])
    if count(whole.text) <= budget:
        return [whole]
    chunks = chunk_lines(source, lines, count, chunk_tokens=max(32, min(256, budget // 3)), overlap=16)
    index = Index(torch.zeros(len(chunks), 0), chunks, {"encoder": {"name": "none"}})
    chosen, used = [], 0
    for hit in index.search(question, mode="lexical", k=len(chunks)):
        size = count(hit.chunk.text) + 16  # its header line
        if used + size <= budget:
            chosen.append(hit.chunk)
            used += size
    if not chosen:  # no word in common: the start of the context
        chosen = [chunks[0]]
    return sorted(chosen, key=lambda c: c.start_line)


def answer(generator, tokenizer, question: str, chunks: list[Chunk], max_new_tokens: int = ANSWER_TOKENS,
           hint: str = "ask a shorter question") -> Answer:
    """The chat model's answer from `chunks` as numbered sources, or from what it knows when there
    are none (greedy, so it is repeatable). `hint` says what to do when they do not fit."""
    from pocketlm.tasks import instruct

    message = sources_prompt(question, chunks) if chunks else question
    try:
        reply = instruct(generator, tokenizer, message, system=SYSTEM if chunks else None,
                         max_new_tokens=max_new_tokens)
    except ContextLengthError as e:
        raise ContextLengthError(f"{e}: {hint}") from None
    return Answer(reply.text, chunks)


def retrieved(index: Index, question: str, encoder, k: int) -> list[Chunk]:
    hits: list[Hit] = index.search(question, encoder, k=k)
    return [h.chunk for h in hits]
