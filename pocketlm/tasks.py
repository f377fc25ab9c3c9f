"""Tasks an instruct model does from a plain instruction: summarize, translate, answer a question
from a context, write code.

Each task is one user message — an instruction and the text — put through the model's chat
template (or the plain "User:/Assistant:" transcript for a model without one) and decoded
greedily, so the same input gives the same answer; `num_beams=4` asks for beam search instead
(except in question answering, whose score is the greedy answer's probability).
Texts longer than the model's window are split into pieces that fit, at paragraph and sentence
boundaries: the summaries of the pieces are summarized again, the translations of the pieces are
joined, and a question is answered from the parts of the context that match it best (BM25).

    gen = Generator(model, tokenizer)
    summarize(gen, tokenizer, open("report.txt").read())
    translate(gen, tokenizer, "Where is the station?", target="fr")
    answer_question(gen, tokenizer, "Who wrote it?", context)   # {"answer", "score", "start", "end"}
    write_code(gen, tokenizer, "reverse a string")               # the code block of the reply
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from pocketlm.errors import ConfigError, ContextLengthError, ModelOutputError

log = logging.getLogger(__name__)

# Language codes as translation task names use them (translation_en_to_fr), with their names for
# the instruction. Any other language can be given by name ("Swahili").
LANGUAGES = {"ar": "Arabic", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
             "es": "Spanish", "fi": "Finnish", "fr": "French", "hi": "Hindi", "hu": "Hungarian",
             "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
             "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
             "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese"}

SUMMARY_TOKENS = 128
CODE_TOKENS = 384
ANSWER_TOKENS = 48
_MAX_ROUNDS = 4  # summaries of summaries: each round shrinks the text many times over


@dataclass
class Reply:
    text: str
    logprob: float | None  # the mean log-probability of the reply's tokens (asked for with logprobs=True)
    finish_reason: str


def instruct(generator, tokenizer, message: str, *, system: str | None = None, max_new_tokens: int = 128,
             logprobs: bool = False, examples: tuple[tuple[str, str], ...] = (), **generation) -> Reply:
    """The model's reply to one user message (greedy unless `generation` says otherwise), after
    `examples`: (message, reply) turns shown to the model first, as worked examples."""
    from pocketlm.chat import ChatSession

    window = generator.model.config.max_position
    if max_new_tokens >= window:
        raise ContextLengthError(f"max_new_tokens={max_new_tokens} leaves no room for the text in the model's "
                                 f"context window of {window} tokens")
    session = ChatSession(tokenizer, window, system=system, max_new_tokens=max_new_tokens)
    for shown, reply in examples:
        session.add("user", shown)
        session.add("assistant", reply)
    session.add("user", message)
    ids = session.encode()
    if len(ids) + max_new_tokens > window:
        raise ContextLengthError(f"the instruction and text take {len(ids)} tokens; with {max_new_tokens} for the "
                                 f"reply that exceeds the model's context window of {window} tokens")
    if not any(k in generation for k in ("do_sample", "temperature", "top_k", "top_p", "min_p")):
        generation["do_sample"] = False
    stop = list(generation.pop("stop", None) or []) + session.stop
    out = generator.generate(ids, max_new_tokens=max_new_tokens, stop_token_ids=session.stop_token_ids,
                             logprobs=0 if logprobs else None, **({"stop": stop} if stop else {}), **generation)
    mean = None
    if logprobs and out.logprobs:
        mean = sum(t.logprob for t in out.logprobs) / len(out.logprobs)
    return Reply(out.text.strip(), mean, out.finish_reason)


def room(generator, tokenizer, max_new_tokens: int, instruction: str = "",
         examples: tuple[tuple[str, str], ...] = (), system: str | None = None) -> int:
    """Tokens of text one message can carry: the window less the reply, and less the prompt as the
    chat template renders it around `instruction` with no text in it (after `system`, or the
    template's default system message, and `examples`, as `instruct` sends them), with a small
    margin for how a piece tokenizes beside the instruction."""
    from pocketlm.chat import ChatSession

    window = generator.model.config.max_position
    session = ChatSession(tokenizer, window, system=system)
    for shown, reply in examples:
        session.add("user", shown)
        session.add("assistant", reply)
    session.add("user", instruction)
    fixed = len(session.encode())
    budget = window - max_new_tokens - fixed - 8
    if budget < 16:
        raise ContextLengthError(f"the instruction ({fixed} tokens as the chat template renders it) and "
                                 f"{max_new_tokens} tokens for the reply leave no room for the text in the model's "
                                 f"context window of {window} tokens; ask for a shorter reply (max_new_tokens) or "
                                 "use a model with a longer window")
    return budget


def split_text(text: str, tokenizer, budget: int) -> list[str]:
    """`text` cut into pieces of at most `budget` tokens: whole paragraphs where they fit, else
    whole sentences, else (a sentence longer than a piece) runs of tokens."""
    def count(t: str) -> int:
        return len(tokenizer.encode(t, add_special_tokens=False))

    units: list[tuple[str, str]] = []  # (text, separator before it)
    for p, paragraph in enumerate(re.split(r"\n\s*\n", text.strip())):
        sep = "\n\n" if p else ""
        if count(paragraph) <= budget:
            units.append((paragraph, sep))
            continue
        for s, sentence in enumerate(re.split(r"(?<=[.!?])\s+|(?<=[。！？])|\n", paragraph)):
            if not sentence.strip():
                continue
            first = sep if s == 0 else " "
            if count(sentence) <= budget:
                units.append((sentence, first))
                continue
            for w, word in enumerate(_word_runs(sentence, count, budget)):  # a sentence too long for a piece
                units.append((word, first if w == 0 else " "))
    pieces: list[str] = []
    current, used = "", 0
    gaps = {sep: count(sep) for sep in ("", " ", "\n\n")}
    for unit, sep in units:
        size = count(unit)
        if current and used + gaps[sep] + size > budget:
            pieces.append(current)
            current, used = "", 0
        if current:
            current, used = current + sep, used + gaps[sep]
        current, used = current + unit, used + size
    if current.strip():
        pieces.append(current)
    return pieces


def _word_runs(sentence: str, count, budget: int) -> list[str]:
    """A sentence longer than `budget` tokens as runs of whole words that fit (a single word
    longer than that, as runs of characters): cut where the text has a boundary, so no character
    and no word is split between two token runs."""
    runs: list[str] = []
    for word in sentence.split():
        while count(word) > budget:  # no spaces to cut at (a URL, or text written without spaces)
            cut = len(word) // 2
            while cut > 1 and count(word[:cut]) > budget:
                cut //= 2
            runs.append(word[:cut])
            word = word[cut:]
        if runs and count(runs[-1] + " " + word) <= budget:
            runs[-1] += " " + word
        else:
            runs.append(word)
    return runs


# --- summarization ------------------------------------------------------------------------------

SUMMARIZE = "Summarize the following text in a few sentences. Reply with the summary only.\n\n{text}"


def summarize(generator, tokenizer, text: str, max_new_tokens: int = SUMMARY_TOKENS, **generation) -> str:
    """A summary of `text`; a text longer than the window is summarized piece by piece, and the
    joined summaries again, until they fit one message."""
    text = _nonempty(text, "summarize")
    budget = room(generator, tokenizer, max_new_tokens, SUMMARIZE.format(text=""))
    for _ in range(_MAX_ROUNDS):
        pieces = split_text(text, tokenizer, budget)
        summaries = [instruct(generator, tokenizer, SUMMARIZE.format(text=piece), max_new_tokens=max_new_tokens,
                              **generation).text for piece in pieces]
        text = "\n\n".join(s for s in summaries if s)
        if not text:
            raise ModelOutputError("the model wrote an empty summary; try another model or --num-beams")
        if len(pieces) == 1:
            return text
    log.warning("the summaries still did not fit one message after %d rounds; returning the last round's %d",
                _MAX_ROUNDS, len(pieces))
    return text


# --- translation --------------------------------------------------------------------------------

TRANSLATE = "Translate the following text from {source} to {target}. Reply with the translation only.\n\n{text}"
TRANSLATE_ANY = "Translate the following text to {target}. Reply with the translation only.\n\n{text}"


def language_name(code: str) -> str:
    """'fr' → 'French'; a name passes through ('Swahili'); anything else is refused."""
    if not isinstance(code, str) or not code.strip():
        raise ConfigError(f"a language must be a code such as 'fr' or a name such as 'French', got {code!r}")
    code = code.strip()
    if code.lower() in LANGUAGES:
        return LANGUAGES[code.lower()]
    base = re.split(r"[_-]", code)[0].lower()  # fr_XX, pt-BR
    if base in LANGUAGES and len(base) == 2:
        return LANGUAGES[base]
    if re.fullmatch(r"[A-Za-z][A-Za-z ]{2,30}", code):
        return code[0].upper() + code[1:]
    raise ConfigError(f"unknown language {code!r}; give a code ({', '.join(sorted(LANGUAGES))}) or a language's "
                      "name in English")


def translate(generator, tokenizer, text: str, target: str, source: str | None = None,
              max_new_tokens: int | None = None, **generation) -> str:
    """`text` in the `target` language (a code or a name); long texts go piece by piece, each
    piece with room for a reply twice its length."""
    text = _nonempty(text, "translate")
    target_name = language_name(target)
    template = TRANSLATE if source else TRANSLATE_ANY
    filled = {"target": target_name, "source": language_name(source) if source else ""}
    window = generator.model.config.max_position
    instruction = template.format(text="", **filled)
    if max_new_tokens:  # the reply's length is fixed: the pieces get the rest
        budget = room(generator, tokenizer, max_new_tokens, instruction)
    else:  # each piece, and twice as much (+ 16) for its translation
        budget = room(generator, tokenizer, 16, instruction) // 3
        if budget < 16:
            raise ContextLengthError(f"the model's context window of {window} tokens leaves no room for a text and "
                                     "its translation")
    out = []
    for piece in split_text(text, tokenizer, budget):
        size = len(tokenizer.encode(piece, add_special_tokens=False))
        reply = instruct(generator, tokenizer, template.format(text=piece, **filled),
                         max_new_tokens=max_new_tokens or 2 * size + 16, **generation)
        if reply.finish_reason == "length":
            log.warning("a translated piece reached its length limit and may be cut short (%d tokens); pass "
                        "max_new_tokens for more", max_new_tokens or 2 * size + 16)
        out.append(reply.text)
    return "\n\n".join(out)


# --- question answering -------------------------------------------------------------------------

ANSWER = ("Answer the question from the context. Reply with the answer only: a short phrase, copied word for word "
          "from the context when it is there.\n\nContext:\n{context}\n\nQuestion: {question}")
# One worked example: without it a small model answers in whole sentences ("The tower was designed
# by Gustave Eiffel."); with it, in the short phrase asked for ("Gustave Eiffel").
ANSWER_EXAMPLE = (ANSWER.format(context="Marie Curie was born in Warsaw in 1867. She won two Nobel Prizes.",
                                question="Where was Marie Curie born?"), "Warsaw")
_PREAMBLE = re.compile(r"^(the\s+)?answer\b(\s+is\b)?\s*[:\-]?\s*", re.IGNORECASE)


def answer_question(generator, tokenizer, question: str, context: str, max_new_tokens: int = ANSWER_TOKENS,
                    **generation) -> dict:
    """{"answer", "score", "start", "end"} as a question-answering pipeline gives them: the
    answer, the geometric mean of the probabilities of the reply's tokens (the end-of-turn token
    included), and its character offsets in `context` (context[start:end] == answer) when it is a
    span of the context, else None. A context longer than the window is cut to the parts that
    match the question best (BM25)."""
    from pocketlm.rag import context_chunks

    question = _nonempty(question, "answer: the question")
    context = _nonempty(context, "answer from: the context")
    if (generation.get("num_beams") or 1) > 1:
        raise ConfigError("question answering decodes greedily, so its score is the answer's probability; drop "
                          "num_beams")
    budget = room(generator, tokenizer, max_new_tokens, ANSWER.format(context="", question=question),
                  examples=(ANSWER_EXAMPLE,))
    chunks = context_chunks(context, question, tokenizer, budget)
    shown = "\n".join(c.text for c in chunks)
    reply = instruct(generator, tokenizer, ANSWER.format(context=shown, question=question),
                     max_new_tokens=max_new_tokens, logprobs=True, examples=(ANSWER_EXAMPLE,), **generation)
    text = reply.text.splitlines()[0].strip() if reply.text else ""
    text = _PREAMBLE.sub("", text).strip()
    start, end, text = locate(text, context, question, within=_spans(context, chunks))
    score = math.exp(reply.logprob) if reply.logprob is not None else 0.0
    return {"score": score, "start": start, "end": end, "answer": text}


def locate(answer: str, context: str, question: str = "",
           within: list[tuple[int, int]] = ()) -> tuple[int | None, int | None, str]:
    """Where `answer` sits in `context`: (start, end, the context's own text there). Tried
    without closing punctuation or quotes, then as written: whole words, ignoring case, any run
    of spaces or line breaks matching any other. A sentence-long answer ("The tower stands in
    Paris, France.") is narrowed to its run of words that is in the context and names the most
    things the question does not ("Paris"; the later run on a tie, as a sentence's answer comes
    last). A match inside `within` (the character spans the model was shown) wins over one
    elsewhere. (None, None, answer) when no such run is found."""
    for candidate in (_trimmed(answer), answer):
        found = _find(candidate, context, within)
        if found:
            return found
    words = answer.split()
    asked = {_stem(w) for w in re.findall(r"\w+", question)} | _STOPWORDS
    best, best_key = None, None
    for i in range(len(words)):
        for j in range(i + 1, len(words) + 1):
            run = _trimmed(" ".join(_edges_trimmed(words[i:j])))
            new = {_stem(w) for w in re.findall(r"\w+", run)} - asked
            key = (len(new), j, -len(run))
            if new and (best_key is None or key > best_key):
                found = _find(run, context, within)
                if found:
                    best, best_key = found, key
    return best or (None, None, answer)


_STOPWORDS = {"a", "an", "the", "it", "its", "is", "was", "were", "are", "be", "been", "by", "of", "in", "on", "at",
              "to", "for", "and", "or", "with", "from", "as", "that", "this", "he", "she", "they", "his", "her",
              "their", "there", "answer"}


def _stem(word: str) -> str:
    word = word.lower()
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def _edges_trimmed(words: list[str]) -> list[str]:
    """Words without stopwords at either end ("in Paris" → "Paris")."""
    plain = [re.sub(r"\W", "", w).lower() for w in words]
    i, j = 0, len(words)
    while i < j and plain[i] in _STOPWORDS:
        i += 1
    while j > i and plain[j - 1] in _STOPWORDS:
        j -= 1
    return words[i:j]


def _trimmed(text: str) -> str:
    return text.strip("\"'“”‘’()[] ").rstrip(".!?;:,").strip()


def _find(candidate: str, context: str, within) -> tuple[int, int, str] | None:
    if not candidate.strip():
        return None
    pattern = r"\s+".join(re.escape(word) for word in candidate.split())
    pattern = (r"\b" if re.match(r"\w", candidate) else "") + pattern + (r"\b" if re.search(r"\w$", candidate) else "")
    matches = list(re.finditer(pattern, context, re.IGNORECASE))
    if not matches:
        return None
    inside = [m for m in matches if any(lo <= m.start() and m.end() <= hi for lo, hi in within)]
    m = (inside or matches)[0]
    return m.start(), m.end(), m[0]


def _spans(context: str, chunks) -> list[tuple[int, int]]:
    """The character spans of `context` that chunks (numbered by line, as context_chunks numbers
    them) cover."""
    starts, at = [], 0
    for line in context.splitlines(keepends=True):
        starts.append(at)
        at += len(line)
    starts.append(at)
    return [(starts[c.start_line - 1], starts[c.end_line]) for c in chunks]


# --- code ---------------------------------------------------------------------------------------

CODE = "Write {language} code for this task. Reply with one code block and nothing else.\n\nTask: {task}"
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def write_code(generator, tokenizer, task: str, language: str = "Python", max_new_tokens: int = CODE_TOKENS,
               **generation) -> str:
    """The code the model writes for `task`: the first fenced block of its reply, or the whole
    reply when it wrote no fence."""
    task = _nonempty(task, "write code for: the task")
    reply = instruct(generator, tokenizer, CODE.format(language=language, task=task),
                     max_new_tokens=max_new_tokens, **generation)
    return code_block(reply.text)


def code_block(text: str) -> str:
    found = _FENCE.search(text)
    return (found[1] if found else text).strip("\n")


def _nonempty(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise ConfigError(f"nothing to {what}: expected text, got {type(text).__name__}")
    if not text.strip():
        raise ConfigError(f"nothing to {what}: the text is empty")
    return text
