"""pack_linears: the same model (outputs, gradients, parameters, state dict, checkpoints), with
weights laid out for fast few-row products on CPU."""

import pytest
import torch
from torch import nn

from conftest import TINY, randomize
from pocketlm.checkpoint import load_pretrained, save_pretrained
from pocketlm.config import ModelConfig
from pocketlm.errors import ContextLengthError
from pocketlm.model import Transformer
from pocketlm.packing import DecodeStep, FastLinear, FusedWeights, pack_linears, unpack_linears


def _model(name: str, seed: int = 0) -> Transformer:
    return randomize(Transformer(ModelConfig(**TINY[name])), seed).eval()


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("in_f,out_f,bias", [(32, 96, True), (96, 32, False), (24, 24, True), (32, 7, True)])
def test_fast_linear_matches_linear(in_f, out_f, bias, threads):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=bias)
    reference = nn.Linear(in_f, out_f, bias=bias)
    reference.load_state_dict(linear.state_dict())
    assert pack_linears(linear) == 1 and type(linear) is FastLinear
    assert linear.weight.shape == (out_f, in_f)
    for shape in ((1, in_f), (3, in_f), (512, in_f), (2, 5, in_f), (1, 1, in_f)):
        x = torch.randn(shape)
        assert torch.allclose(linear(x), reference(x), atol=1e-5), shape


@pytest.mark.parametrize("M", [1, 40])
def test_gradients_match_linear(M):
    torch.manual_seed(0)
    packed, reference = nn.Linear(32, 48), nn.Linear(32, 48)
    reference.load_state_dict(packed.state_dict())
    pack_linears(packed)
    x = torch.randn(M, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    target = torch.randn(M, 48)
    ((packed(x) - target) ** 2).sum().backward()
    ((reference(x_ref) - target) ** 2).sum().backward()
    assert torch.allclose(packed.weight.grad, reference.weight.grad, atol=1e-4)
    assert torch.allclose(packed.bias.grad, reference.bias.grad, atol=1e-4)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)


def test_bf16():
    torch.manual_seed(0)
    packed = nn.Linear(64, 128).to(torch.bfloat16)
    reference = nn.Linear(64, 128).to(torch.bfloat16)
    reference.load_state_dict(packed.state_dict())
    pack_linears(packed)
    for M in (1, 3, 100):
        x = torch.randn(M, 64, dtype=torch.bfloat16)
        assert packed(x).dtype == torch.bfloat16
        assert torch.allclose(packed(x).float(), reference(x).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", sorted(TINY))
def test_packed_model_is_the_same_model(name):
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    n_bytes, n_linear = _tensor_bytes(model), sum(type(m) is nn.Linear for m in model.modules())

    assert pack_linears(model) == n_linear and pack_linears(model) == 0  # idempotent
    assert {k: id(p) for k, p in model.named_parameters()} == params  # optimizers stay valid
    assert _tensor_bytes(model) == n_bytes
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.t().is_contiguous()  # the output side (vocab) is longer

    assert unpack_linears(model) == n_linear
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_decode_with_cache_matches():
    model = _model("llama-gqa-tied")
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        full = model(ids).logits
        pack_linears(model)
        cache = model.new_cache(1, 16)
        model(ids[:, :4], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(4, 7)]
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 4:], atol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-mha-untied"])
def test_decode_step_is_the_models_forward_with_a_cache(name, threads):
    """The flat decode loop against Transformer.forward: a left-padded batch, several steps,
    logits and the cache contents both."""
    model = _model(name)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        pack_linears(model)
        step = DecodeStep.for_model(model)
        assert step is not None
        ours, theirs = model.new_cache(2, 12), model.new_cache(2, 12)
        for cache in (ours, theirs):
            model(ids, attention_mask=mask, cache=cache, position_ids=positions)
        for t in range(4):
            tokens = torch.randint(0, V, (2,))
            mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), dim=1)
            positions = positions[:, -1:] + 1
            expected = model(tokens[:, None], attention_mask=mask, cache=theirs, position_ids=positions).logits[:, -1]
            got = step(tokens, positions[:, 0], ours, mask.bool())
            assert torch.allclose(got, expected, atol=1e-5), (t, (got - expected).abs().max())
        assert ours.length == theirs.length == 9
        for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values):
            assert torch.allclose(a, b, atol=1e-6)
        full = model.new_cache(2, ours.length)
        full.length = ours.length
        with pytest.raises(ContextLengthError):
            step(tokens, positions[:, 0] + 1, full)


def test_decode_step_only_where_it_is_the_same_model():
    llama = _model("llama-gqa-tied")
    with torch.no_grad():
        assert DecodeStep.for_model(llama) is None  # not packed
        pack_linears(llama)
        assert DecodeStep.for_model(llama) is not None
        gpt2 = _model("gpt2-tied")
        pack_linears(gpt2)
        assert DecodeStep.for_model(gpt2) is None  # learned positions, LayerNorm, GELU, biases
        llama.to(torch.float64)  # weights leave the fused buffers
        assert DecodeStep.for_model(llama) is None
    llama = _model("llama-gqa-tied")
    pack_linears(llama)
    assert DecodeStep.for_model(llama) is None  # grad on: training must see the modules


def test_load_state_dict_and_save_load_round_trip(tmp_path):
    source, target = _model("llama-gqa-tied", seed=1), _model("llama-gqa-tied", seed=2)
    pack_linears(target)
    target.load_state_dict(source.state_dict())
    assert target.lm_head.weight is target.model.embed_tokens.weight
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.allclose(target(ids).logits, source(ids).logits, atol=1e-5)
    save_pretrained(target, tmp_path)
    with torch.no_grad():
        assert torch.allclose(load_pretrained(tmp_path)(ids).logits, source(ids).logits, atol=1e-5)


def test_optimizer_created_before_packing_still_trains_the_model():
    torch.manual_seed(0)
    packed, reference = _model("llama-mha-untied"), _model("llama-mha-untied")
    opt_p = torch.optim.AdamW(packed.parameters(), lr=1e-2)
    opt_r = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    pack_linears(packed)
    ids = torch.randint(0, 96, (2, 8))
    for model, opt in ((packed, opt_p), (reference, opt_r)):
        model.train()
        model(ids, labels=ids).loss.backward()
        opt.step()
    for (name, p), r in zip(packed.named_parameters(), reference.parameters()):
        assert torch.allclose(p, r, atol=1e-5), name
    # the optimizer updated the weights in place, so the fused buffers hold the new values too
    packed.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, reference(ids).logits, atol=1e-5)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = FusedWeights.__call__
    monkeypatch.setattr(FusedWeights, "__call__", lambda self, x: calls.append(self) or original(self, x))
    return calls


@pytest.mark.parametrize("name", sorted(TINY))
def test_fused_projections_run_as_one_product_without_grad(name, fused_calls):
    model, reference = _model(name), _model(name)
    pack_linears(model)
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj.weight, attn.k_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # one buffer
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    per_layer = 2 if model.config.mlp == "swiglu" else 1  # q|k|v, and gate|up in SwiGLU
    assert len(fused_calls) == per_layer * model.config.n_layer
    fused_calls.clear()
    model(ids).logits.sum().backward()  # with grad the separate products run, so grads reach them
    assert not fused_calls and q.grad is not None and k.grad is not None


def test_fused_path_follows_weights_that_move_or_change(fused_calls):
    model, reference = _model("llama-gqa-tied", seed=3), _model("llama-gqa-tied", seed=3)
    pack_linears(model)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        for m in (model, reference):  # an in-place edit of one weight reaches the fused buffer
            m.model.layers[1].self_attn.v_proj.weight.mul_(2.0)
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
        model.to(torch.float64)  # new storage for every parameter: the stale buffer must not be used
        fused_calls.clear()
        assert torch.allclose(model(ids).logits, reference.to(torch.float64)(ids).logits, atol=1e-10)
        assert not fused_calls
        other = _model("llama-gqa-tied", seed=4).to(torch.float64)
        model.load_state_dict(other.state_dict(), assign=True)
        model.tie_weights()
        assert torch.allclose(model(ids).logits, other(ids).logits, atol=1e-10)


def test_include_filter_and_gpu_models_untouched():
    model = _model("llama-gqa-tied")
    assert pack_linears(model, include=lambda n: n.endswith("mlp.up_proj")) == model.config.n_layer
    assert type(model.lm_head) is nn.Linear
    meta = Transformer(ModelConfig(**TINY["gpt2-untied"])).to("meta")
    assert pack_linears(meta) == 0


@pytest.mark.parametrize("name", sorted(TINY))
def test_loading_reads_the_output_head_in_the_layout_packing_wants(name, tmp_path, monkeypatch):
    source = _model(name, seed=5)
    save_pretrained(source, tmp_path)
    monkeypatch.setattr("pocketlm.checkpoint.TRANSPOSED_READ_BYTES", 100)  # several bounce reads
    model = load_pretrained(tmp_path)
    head = model.lm_head.weight
    assert head.t().is_contiguous() and torch.equal(head, source.lm_head.weight)
    storage = head.untyped_storage().data_ptr()
    pack_linears(model)  # nothing left to re-lay out, so no second copy of the head
    assert model.lm_head.weight.untyped_storage().data_ptr() == storage
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-5)
