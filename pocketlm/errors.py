"""Typed errors. Every failure a user can cause surfaces as a PocketLMError subclass whose
message says what was wrong, where, and what to do about it. The CLI turns these into one line
on stderr and exit code 2; the server turns them into OpenAI-shaped JSON errors."""


class PocketLMError(Exception):
    """Base class of every error pocketlm raises on purpose."""


class ConfigError(PocketLMError, ValueError):
    """A model, tokenizer or generation configuration is invalid or inconsistent."""


class FormatError(PocketLMError, ValueError):
    """A file is malformed: truncated, lying header, wrong dtypes or shapes, unknown tensors."""


class NotFoundError(PocketLMError, FileNotFoundError):
    """A path or model name does not point at anything pocketlm can load."""


class UnsafeFormatError(PocketLMError):
    """Loading would need pickle, which pocketlm refuses unless explicitly allowed."""


class TokenizerError(PocketLMError, ValueError):
    """A tokenizer is missing, malformed, or does not fit the model it is used with."""


class ContextLengthError(PocketLMError, ValueError):
    """A request needs more positions than the model's context window holds."""


class ModelOutputError(PocketLMError):
    """The model's output cannot serve the task (an empty summary, say): another model or setting may."""
