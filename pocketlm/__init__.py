"""pocketlm: a small, complete large-language-model toolkit on PyTorch.

Heavy modules load lazily, so `import pocketlm` stays fast; `pocketlm.AutoModelForCausalLM`
and friends import their module on first use.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "config",
    "PRESETS": "config",
    "Transformer": "model",
    "KVCache": "model",
    "Tokenizer": "tokenizer",
    "AutoTokenizer": "api",
    "AutoModelForCausalLM": "api",
    "AutoConfig": "api",
    "GPT2Tokenizer": "api",
    "GPT2LMHeadModel": "api",
    "LlamaForCausalLM": "api",
    "AutoModelForSequenceClassification": "api",
    "GPT2ForSequenceClassification": "api",
    "LlamaForSequenceClassification": "api",
    "pipeline": "pipelines",
    "GenerationConfig": "generate",
    "TextStreamer": "generate",
    "PocketLMError": "errors",
    "ConfigError": "errors",
    "FormatError": "errors",
    "NotFoundError": "errors",
    "UnsafeFormatError": "errors",
    "TokenizerError": "errors",
    "ContextLengthError": "errors",
    "ModelOutputError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"pocketlm.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
