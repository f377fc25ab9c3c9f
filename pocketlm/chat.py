"""Chat templates: turn a list of messages into the prompt text a chat model was trained on.

A checkpoint's tokenizer_config.json carries its chat template, a Jinja program written by
whoever published the model. `render_chat` runs it the way transformers'
`apply_chat_template(messages, tokenize=False)` does — same sandbox, same globals, same filters —
so a prompt rendered here is byte-for-byte the prompt the model saw in training:

    render_chat(tokenizer.chat_template, [{"role": "user", "content": "Hi"}],
                bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)

Templates are untrusted code: they run in Jinja's immutable sandbox, and anything that goes wrong
inside one (syntax, a forbidden attribute, `raise_exception`) becomes a TokenizerError.

`ChatSession` keeps a multi-turn conversation for the CLI and apps: it renders and encodes the
prompt, and when prompt + reply would outgrow the context window it drops the oldest turns
(never the system message, never the latest user message). Models without a chat template get
`PLAIN_TEMPLATE`, a "User: …\\nAssistant:" transcript that stops at the next "\\nUser:".
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from pocketlm.errors import ConfigError, ContextLengthError, TokenizerError

log = logging.getLogger(__name__)

# The fallback for checkpoints without a chat template (e.g. a base model trained here). It
# renders a plain transcript; the model's answer ends where it starts writing the next user turn.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
PLAIN_STOP = "\nUser:"

# Tokens that published templates put after each message. When one appears in the template and in
# the vocabulary, generation stops at it, whatever the checkpoint calls its eos token (base models
# often name <|endoftext|> as eos while the chat template ends turns with <|im_end|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "</s>")

# Budgets for untrusted templates: published ones are a few KB and render a few KB per conversation
MAX_TEMPLATE_BYTES = 64 * 1024
MAX_RENDERED_CHARS = 4 * 1024 * 1024
MAX_TEMPLATE_STEPS = 1_000_000  # range() items per render
MAX_RESULT_BITS = 4096
_RENDER_BUDGET: contextvars.ContextVar[list[int]] = contextvars.ContextVar("render_budget", default=[0])

# Appended to the final message for continue_final_message, to find where the template wrote its
# end (the space tells whether the template strips the message's trailing whitespace).
CONTINUE_MARK = "POCKETLM_CONTINUE_FINAL_MESSAGE "

# Reply budget when neither the caller nor the checkpoint sets max_new_tokens; at most half the
# window, so a small model still has room for some history.
DEFAULT_REPLY_TOKENS = 256


# --- rendering -------------------------------------------------------------------------------------

def render_chat(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, bos_token: str | None = None,
                eos_token: str | None = None, **extra: Any) -> str:
    """Render `messages` with a chat template, as transformers' `apply_chat_template(...,
    tokenize=False)` does. Unlike transformers, add_generation_prompt defaults to True: here the
    rendered text is almost always a prompt for the model's next answer. continue_final_message
    ends the text inside the last message, for the model to go on writing it (a prefilled answer).

    `extra` holds further template variables (e.g. `tools`, `unk_token`, `enable_thinking`).
    Special tokens that are None are left undefined, as transformers leaves them out."""
    if not isinstance(template, str) or not template:
        raise TokenizerError("the chat template must be a non-empty string")
    plain = _plain_messages(messages)
    if continue_final_message:
        if add_generation_prompt:
            raise ConfigError("continue_final_message and add_generation_prompt exclude each other: one continues "
                              "the last message, the other starts a new assistant message; pass one")
        plain[-1]["content"] += CONTINUE_MARK
    variables = {"tools": None, "documents": None}  # transformers always defines these
    variables.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None})
    variables.update(_plain_json(extra, "template variables"))
    if len(template.encode("utf-8")) > MAX_TEMPLATE_BYTES:
        raise TokenizerError(f"the chat template is {len(template.encode('utf-8')):,} bytes; templates of "
                             f"published models are a few KB, and pocketlm refuses more than {MAX_TEMPLATE_BYTES:,}")
    compiled = _compile(template)
    budget = _RENDER_BUDGET.set([MAX_TEMPLATE_STEPS])
    try:
        parts, size = [], 0
        for part in compiled.generate(messages=plain, add_generation_prompt=add_generation_prompt, **variables):
            size += len(part)
            if size > MAX_RENDERED_CHARS:
                raise SecurityError(f"its output passed {MAX_RENDERED_CHARS:,} characters")
            parts.append(part)
        text = "".join(parts)
    except SecurityError as e:
        raise TokenizerError(f"the chat template tried something its sandbox forbids: {e}") from None
    except TemplateError as e:  # raise_exception(...) lands here too, with the template's own words
        raise TokenizerError(f"the chat template failed on these messages: {e}") from None
    except RecursionError:
        raise TokenizerError("the chat template recursed too deeply") from None
    except Exception as e:
        # the template is someone else's program: any error it raises (a str + int, a missing
        # key) is a problem with the template or the messages it was given, not with pocketlm
        raise TokenizerError(f"the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _RENDER_BUDGET.reset(budget)
    return _cut_at_mark(text, messages[-1]["content"]) if continue_final_message else text


def _cut_at_mark(text: str, final: str) -> str:
    """The rendered text up to where the final message ends (marked by CONTINUE_MARK)."""
    at = text.rfind(CONTINUE_MARK.strip())
    if at < 0 or final.strip() not in text:
        raise TokenizerError("continue_final_message: the chat template does not write the final message as "
                             "given, so there is no place to continue it")
    if text.startswith(CONTINUE_MARK, at):
        return text[:at]
    return text[:at].rstrip()  # the template stripped the message, and its own trailing space with it


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks in
    transformers; for rendering it is transparent, but templates that use it must still parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateDict:
    """Stands in for the `dict` global: the real type would let `dict.update(messages[0], …)`
    mutate data, because the immutable sandbox only checks calls on instances."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so no template can reach Python internals
    through attributes it stores on one."""

    def __init__(*args, **kwargs):  # the signature trick of jinja's Namespace: `self` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold the underscore name {name!r}")


class _StrictSandbox(ImmutableSandboxedEnvironment):
    # Jinja's sandbox turns a forbidden attribute into an Undefined that only fails when used, so
    # `{{ x.__class__ }}` would print nothing. No legitimate template reads such attributes: fail at once.
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    # Budgets, so an untrusted template can neither allocate without bound ('x' * 10**10, 9**9**9)
    # nor loop for hours (nested range() loops): both end in a SecurityError.
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                abs(right) * max(abs(left), 2).bit_length() > MAX_RESULT_BITS:
            raise SecurityError(f"{left} ** {right} is too large a number for a chat template")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED_CHARS:
                    raise SecurityError("a repetition that large has no place in a chat template")
        return super().call_binop(context, operator, left, right)


def _budgeted_range(*args):
    """range() whose items count against the render's step budget (jinja's own caps one range at
    100,000 items, but nested loops multiply)."""
    for item in safe_range(*args):
        budget = _RENDER_BUDGET.get()
        budget[0] -= 1
        if budget[0] < 0:
            raise SecurityError(f"the template looped more than {MAX_TEMPLATE_STEPS:,} times")
        yield item


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' version: Jinja's own tojson escapes <, >, & and ' for HTML, which would change
    # the text of tool schemas inside prompts
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace, range=_budgeted_range)
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template has a syntax error on line {e.lineno}: {e.message}") from None
    except TemplateError as e:
        raise TokenizerError(f"the chat template does not compile: {e}") from None


def _plain_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate messages and copy them into plain JSON data, the only kind a template may see."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                          f"got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConfigError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ConfigError(f"message {i} needs a non-empty string 'role' (system, user, assistant), "
                              f"got {role!r:.40}")
        if not isinstance(content, str):
            raise ConfigError(f"message {i} ({role}) needs a string 'content', got {type(content).__name__}")
    # transformers drops None values, so templates see a missing key rather than the text "None"
    return _plain_json([{k: v for k, v in m.items() if v is not None} for m in messages], "messages")


def _plain_json(value: Any, what: str) -> Any:
    # A JSON round trip strips every object down to dict/list/str/number/bool/None, whose methods
    # the sandbox knows; it also makes the copy, so a template never touches the caller's data.
    try:
        return json.loads(json.dumps(value, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be plain JSON data (strings, numbers, lists, dicts): {e}") from None


# --- a conversation ----------------------------------------------------------------------------------

@dataclass
class ChatPrompt:
    ids: list[int]
    dropped: int  # how many of the oldest turns were dropped to make it fit


class ChatSession:
    """A conversation with one model: an optional system message, then user/assistant turns.

        session = ChatSession(tokenizer, window=model.config.max_position, system="Be brief.")
        session.add("user", "Hi")
        prompt = session.prompt()          # prompt.ids fit the window with room for the reply
        session.add("assistant", answer)
    """

    def __init__(self, tokenizer, window: int, *, system: str | None = None, template: str | None = None,
                 max_new_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.window = window
        self.template = template or tokenizer.chat_template or PLAIN_TEMPLATE
        self.plain = self.template == PLAIN_TEMPLATE
        if self.plain:
            log.debug("the tokenizer has no chat template; using the plain User:/Assistant: format")
        self.max_new_tokens = max_new_tokens or max(1, min(DEFAULT_REPLY_TOKENS, window // 2))
        if self.max_new_tokens >= window:
            raise ContextLengthError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the "
                                     f"model's context window of {window} tokens")
        self.system = system
        self.messages: list[dict[str, str]] = []

    @property
    def stop(self) -> list[str]:
        """Stop strings the format needs: the plain transcript's turn marker, and end-of-turn
        marks the template writes that the vocabulary holds as plain text (a base model given
        ChatML by a fine-tune writes <|im_end|> as several ordinary tokens)."""
        if self.plain:
            return [PLAIN_STOP]
        vocab = self.tokenizer.get_vocab()
        return [t for t in END_OF_TURN_TOKENS if t in self.template and t not in vocab]

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-turn tokens the template writes, when the vocabulary has them."""
        vocab = self.tokenizer.get_vocab()
        return [vocab[t] for t in END_OF_TURN_TOKENS if t in self.template and t in vocab]

    def add(self, role: str, content: str) -> None:
        _plain_messages([{"role": role, "content": content}])  # validate now, not at the next render
        self.messages.append({"role": role, "content": content})

    def reset(self) -> None:
        """Forget every turn; the system message stays."""
        self.messages.clear()

    def conversation(self) -> list[dict[str, str]]:
        return self._system_messages() + self.messages

    def _system_messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system is not None else []

    def render(self, messages: Sequence[dict[str, Any]] | None = None, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(self.conversation() if messages is None else messages,
                                                  add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, chat_template=self.template)

    def encode(self, messages: Sequence[dict[str, Any]] | None = None) -> list[int]:
        # the template already wrote every special token it wants (bos included); adding them
        # again would give the model a prompt it never saw in training
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False)

    def prompt(self) -> ChatPrompt:
        """The ids of the conversation so far plus the assistant header, dropping the oldest turns
        until they and `max_new_tokens` fit the window. Dropped turns are gone from `messages`."""
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ConfigError("the conversation must end with a user message before asking for an answer")
        kept = list(self.messages)
        dropped = 0
        while True:
            ids = self.encode(self._system_messages() + kept)
            if len(ids) + self.max_new_tokens <= self.window:
                break
            if len(kept) == 1:
                what = "the system message and your message" if self.system is not None else "your message"
                raise ContextLengthError(
                    f"{what} take {len(ids)} tokens; with {self.max_new_tokens} tokens for the answer that "
                    f"exceeds the model's context window of {self.window} tokens; write less or ask for a "
                    "shorter answer")
            kept = _without_oldest_turn(kept)
            dropped += 1
        if dropped:
            log.debug("dropped %d oldest turn(s) to fit %d tokens", dropped, self.window)
            self.messages[:] = kept
        return ChatPrompt(ids=ids, dropped=dropped)


def _without_oldest_turn(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Drop the first message and everything up to the next user message, so the history still
    starts with a user turn (many templates raise on an assistant message first)."""
    rest = messages[1:]
    while len(rest) > 1 and rest[0]["role"] != "user":
        rest = rest[1:]
    return rest
