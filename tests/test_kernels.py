"""pocketlm.kernels: the compiled kernels against their pure-PyTorch math (fallback.py), against an
independent plain-PyTorch reference, and against themselves across batch sizes and thread counts
(batch invariance: bit-identical rows)."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from pocketlm import kernels
from pocketlm.kernels import fallback
from pocketlm.quant import quantize


def _module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with kernels.use_compiled(True):
            return kernels.compiled()


needs_compiled = pytest.mark.skipif(_module() is None, reason="the C++ kernels could not be built here "
                                    "(no compiler or ninja): only the PyTorch fallback is tested")


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _weight(out, features, bits, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, features, generator=g) * 0.1
    layer = quantize(w, bits, torch.randn(out, generator=g) if bias else None)
    return layer, (layer.q, layer.scale, layer.offset)


def _reference_linear(x, q, scale, offset, bias, top=127):
    """The blocked math written independently of fallback.py: loops over blocks, float64."""
    M, features = x.shape
    out, blocks = scale.shape
    if q.dtype == torch.int8:
        qw = q.view(out, blocks, 32).double()
    else:
        nibbles = q.view(out, blocks, 16)
        qw = torch.cat((nibbles % 16, nibbles // 16), -1).double()
    y = torch.zeros(M, out, dtype=torch.float64)
    for b in range(blocks):
        xb = x[:, b * 32:(b + 1) * 32]
        amax = xb.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, torch.full_like(amax, top) / amax, torch.zeros_like(amax))
        qx = torch.round(xb * inv).double()  # float32 product, as the kernels round it
        sx = (amax / torch.full_like(amax, top)).double()
        y += scale[:, b].double() * sx * (qx @ qw[:, b].t())
        if offset is not None:
            y += offset[:, b].double() * sx * qx.sum(-1, keepdim=True)
    return (y if bias is None else y + bias.double()).float()


def _close(actual, expected, rel):
    """Within rel of the largest |expected| (the scale and offset terms may cancel elementwise)."""
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item() + 1e-30, f"max error {err:.3g}"


SHAPES = [(1, 32), (7, 64), (33, 608), (577, 576), (7, 608)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out,features", SHAPES)
def test_fallback_linear_matches_reference_and_dequantized_product(bits, out, features):
    layer, (q, scale, offset) = _weight(out, features, bits, bias=True)
    x = torch.randn(5, features)
    y = fallback.linear(x, q, scale, offset, layer.bias)
    _close(y, _reference_linear(x, q, scale, offset, layer.bias), 1e-6)
    # activation quantization costs well under 1 % against the float product of the same weights
    _close(y, F.linear(x, layer.dequantize(), layer.bias), 2e-2)


@needs_compiled
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out,features", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_compiled_linear_matches_fallback(bits, out, features, with_bias, threads):
    layer, (q, scale, offset) = _weight(out, features, bits, seed=out, bias=with_bias)
    module = _module()
    for n_threads, M in ((1, 1), (2, 3), (3, 16), (2, 9)):
        torch.set_num_threads(n_threads)
        x = torch.randn(M, features)
        y = module.linear(x, q, scale, offset, layer.bias)
        assert y.shape == (M, out)
        _close(y, fallback.linear(x, q, scale, offset, layer.bias), 1e-5)
        _close(y, _reference_linear(x, q, scale, offset, layer.bias), 1e-5)


@needs_compiled
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_is_batch_and_thread_invariant(bits, threads):
    _, weight = _weight(577, 608, bits, seed=3)
    module = _module()
    row = torch.randn(1, 608)
    torch.set_num_threads(1)
    alone = module.linear(row, *weight)
    for n_threads in (1, 2, 3):
        torch.set_num_threads(n_threads)
        for M in range(2, 17):
            batch = torch.randn(M, 608) * torch.rand(M, 1) * 10  # neighbours of any scale
            where = M // 2
            batch[where] = row[0]
            assert torch.equal(module.linear(batch, *weight)[where], alone[0]), (n_threads, M)


@needs_compiled
@pytest.mark.parametrize("bits", [4, 8])
def test_tiled_scales_are_the_scales_regrouped_by_output_tile(bits):
    out, features = 37, 96  # a last, partial tile
    layer, (q, scale, offset) = _weight(out, features, bits, seed=7)
    tiles = kernels.tile_scales(scale, offset)
    n_tiles, blocks, width = tiles.shape
    lanes = width // (2 if bits == 4 else 1)  # the SIMD width the kernels were built for
    assert tiles.dtype == torch.float16 and blocks == features // 32 and n_tiles == -(-out // lanes)
    padded = lambda t: torch.cat((t, t.new_zeros(n_tiles * lanes - out, blocks)))  # noqa: E731
    regrouped = lambda t: padded(t).view(n_tiles, lanes, blocks).transpose(1, 2)  # noqa: E731
    assert torch.equal(tiles[..., :lanes], regrouped(scale))
    if bits == 4:
        assert torch.equal(tiles[..., lanes:], regrouped(offset))
    # the product reads them: given or made for the call, the same bits
    x = torch.randn(5, features)
    assert torch.equal(kernels.linear(x, q, scale, offset, None, tiles), kernels.linear(x, q, scale, offset))
    with pytest.raises(RuntimeError, match="tiles must be"):
        kernels.linear(x, q, scale, offset, None, tiles[:-1].contiguous())


@needs_compiled
def test_quantized_layer_keeps_its_tiles_until_the_scales_change():
    layer, _ = _weight(64, 64, 4, seed=8)
    first = layer.kernel_blocks()[3]
    assert layer.kernel_blocks()[3] is first
    x = torch.randn(2, 64)
    before = layer.kernel(x)
    layer.scale.mul_(2)  # in place: the cached tiles are stale and must be remade
    assert layer.kernel_blocks()[3] is not first
    _close(layer.kernel(x), fallback.linear(x, *layer.blocks()), 1e-5)
    assert not torch.allclose(layer.kernel(x), before)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out,features", SHAPES)
def test_int16_activation_linear_is_nearly_the_dequantized_product(bits, out, features, threads):
    layer, weight = _weight(out, features, bits, seed=5, bias=True)
    exact = lambda x: F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double()).float()  # noqa: E731
    module = _module()
    for M in (1, 3, 16, 40):
        x = torch.randn(M, features)
        x[0, 0] = 30.0  # an outlier in a block: int8 steps would be coarse there, int16 ones are not
        reference = _reference_linear(x, *weight, layer.bias, top=32767)
        _close(fallback.linear16(x, *weight, layer.bias), reference, 1e-5)
        _close(reference, exact(x), 2e-4)
        if module is None:
            continue
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            y = module.linear16(x, *weight, layer.bias)
            _close(y, reference, 1e-5)
            # each row alone gives the same bits: the head's logits do not depend on the batch
            assert all(torch.equal(module.linear16(x[m:m + 1], *weight, layer.bias)[0], y[m])
                       for m in range(M)), (M, n_threads)


@needs_compiled
def test_kernels_run_on_several_threads(threads):
    """-fopenmp reached the build: at::parallel_for's OpenMP path is inline in torch's headers, so
    without it the kernels would silently run on one thread."""
    torch.set_num_threads(2)
    assert _module().parallel_threads() == 2
    torch.set_num_threads(1)
    assert _module().parallel_threads() == 1


# --- decode_layer ----------------------------------------------------------------------------------

def _layer(C, H, K, D, I, bits, seed=0):
    g = torch.Generator().manual_seed(seed)

    def blocked(out, features):
        return _weight(out, features, bits, seed=int(torch.randint(1 << 30, (1,), generator=g)))[1]

    return dict(norm1=1 + 0.1 * torch.randn(C, generator=g), qkv=blocked((H + 2 * K) * D, C),
                o=blocked(C, H * D), norm2=1 + 0.1 * torch.randn(C, generator=g),
                gate_up=blocked(2 * I, C), down=blocked(C, I))


def _rope(B, D, positions):
    freqs = positions.float()[:, None] / 10000 ** (torch.arange(0, D, 2).float() / D)
    return torch.cat((freqs.cos(), freqs.cos()), -1), torch.cat((-freqs.sin(), freqs.sin()), -1)


def _reference_layer(x, w, eps, cos, sin, k_cache, v_cache, n, H, K, key_mask):
    """Plain torch: F.rms_norm, RoPE by rotate-half, sdpa with GQA; products by fallback.linear."""
    B, C = x.shape
    D = cos.shape[-1]
    t = fallback.linear(F.rms_norm(x, (C,), w["norm1"], eps), *w["qkv"])
    q, k, v = t.split((H * D, K * D, K * D), -1)
    q, k, v = q.view(B, H, 1, D), k.view(B, K, 1, D), v.view(B, K, D)

    sin_std = torch.cat((-sin[:, :D // 2], sin[:, D // 2:]), -1)[:, None, None]  # unsigned table

    def rotate(u):  # the usual rotate_half form
        u1, u2 = u.chunk(2, -1)
        return u * cos[:, None, None] + torch.cat((-u2, u1), -1) * sin_std

    q, k = rotate(q), rotate(k)
    k_cache[:, :, n] = k[:, :, 0].to(k_cache.dtype)
    v_cache[:, :, n] = v.to(v_cache.dtype)
    mask = None if key_mask is None else key_mask[:, None, None, :n + 1]
    attn = F.scaled_dot_product_attention(q, k_cache[:, :, :n + 1].float(), v_cache[:, :, :n + 1].float(),
                                          attn_mask=mask, enable_gqa=True)
    x = x + fallback.linear(attn.reshape(B, H * D), *w["o"])
    gate, up = fallback.linear(F.rms_norm(x, (C,), w["norm2"], eps), *w["gate_up"]).chunk(2, -1)
    return x + fallback.linear(F.silu(gate) * up, *w["down"])


def _run_layer(fn, x, w, eps, cos, sin, k_cache, v_cache, n, H, K, key_mask):
    return fn(x, w["norm1"], w["qkv"], w["o"], w["norm2"], w["gate_up"], w["down"], eps, cos, sin,
              k_cache, v_cache, n, H, K, key_mask)


def _layer_case(B, H, K, n, cache_dtype, masked, bits=4, seed=0, D=32):
    C, I, S = 64, 96, n + 3
    w = _layer(C, H, K, D, I, bits, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, C, generator=g)
    cos, sin = _rope(B, D, torch.full((B,), n) - torch.arange(B))
    k_cache = torch.randn(B, K, S, D, generator=g).to(cache_dtype)
    v_cache = torch.randn(B, K, S, D, generator=g).to(cache_dtype)
    key_mask = None
    if masked:
        key_mask = torch.rand(B, S, generator=g) > 0.3
        key_mask[:, n] = True  # a row always sees its own token
        key_mask[:, n + 1:] = False
    return x, w, cos, sin, k_cache, v_cache, key_mask


# head_dim 32 runs the generic attention; 64 and 128 the AVX-512 register version (SmolLM2, Llama)
LAYER_CASES = [(0, 9, 3, torch.float32, False, 32), (5, 9, 3, torch.float16, True, 32),
               (300, 4, 4, torch.float32, True, 32), (300, 9, 3, torch.float16, False, 32),
               (1100, 9, 3, torch.float32, True, 32), (1100, 2, 2, torch.float16, True, 32),
               (130, 9, 3, torch.float16, True, 64), (700, 9, 3, torch.float32, False, 64),
               (65, 8, 2, torch.float16, False, 128), (300, 12, 1, torch.float16, True, 64)]


@pytest.mark.parametrize("n,H,K,cache_dtype,masked,D", LAYER_CASES)
def test_decode_layer_matches_reference(n, H, K, cache_dtype, masked, D):
    x, w, cos, sin, k_cache, v_cache, key_mask = _layer_case(2, H, K, n, cache_dtype, masked, D=D)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = _reference_layer(x, w, 1e-5, cos, sin, k_ref, v_ref, n, H, K, key_mask)
    implementations = [fallback.decode_layer] + ([kernels.decode_layer] if _module() is not None else [])
    for decode in implementations:
        k_out, v_out = k_cache.clone(), v_cache.clone()
        y = _run_layer(decode, x, w, 1e-5, cos, sin, k_out, v_out, n, H, K, key_mask)
        # the norms and attention round differently from torch's; a rare activation that lands on
        # the other side of a rounding step moves the output by ~1e-4 of its size
        _close(y, expected, 2e-4)
        assert (y - expected).abs().median() < 1e-5 * expected.abs().max()
        for got, want in ((k_out, k_ref), (v_out, v_ref)):
            torch.testing.assert_close(got, want)  # float16 caches: a rare last-bit rounding
            assert torch.equal(got[:, :, :n], want[:, :, :n]) and torch.equal(got[:, :, n + 1:], want[:, :, n + 1:])


@needs_compiled
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decode_layer_is_batch_and_thread_invariant(cache_dtype, threads):
    n, H, K = 600, 9, 3
    x, w, cos, sin, k_cache, v_cache, key_mask = _layer_case(8, H, K, n, cache_dtype, True, seed=5, D=64)
    torch.set_num_threads(1)
    alone = _run_layer(kernels.decode_layer, x[:1], w, 1e-5, cos[:1], sin[:1], k_cache[:1].clone(),
                       v_cache[:1].clone(), n, H, K, key_mask[:1])
    for n_threads, B in ((2, 8), (3, 5), (2, 2)):
        torch.set_num_threads(n_threads)
        y = _run_layer(kernels.decode_layer, x[:B], w, 1e-5, cos[:B], sin[:B], k_cache[:B].clone(),
                       v_cache[:B].clone(), n, H, K, key_mask[:B])
        assert torch.equal(y[0], alone[0]), (n_threads, B)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decode_layer_rows_of_different_lengths(cache_dtype):
    """The server's slots: each batch row at its own position of its own cache row (lengths, rows)
    gives what that row gives alone in a cache of its own; the compiled kernel bit for bit, the
    fallback within rounding; cache rows not in the batch stay untouched."""
    H, K = 9, 3
    x, w, cos, sin, k_cache, v_cache, _ = _layer_case(3, H, K, 700, cache_dtype, False, seed=7, D=64)
    lengths, rows = torch.tensor([700, 3, 130]), torch.tensor([4, 0, 2])  # cache rows 1, 3 idle
    k_big = torch.randn(5, K, 800, cos.shape[1]).to(cache_dtype)
    v_big = torch.randn(5, K, 800, cos.shape[1]).to(cache_dtype)
    for i, r in enumerate(rows.tolist()):
        k_big[r, :, :703], v_big[r, :, :703] = k_cache[i], v_cache[i]
    implementations = [fallback.decode_layer] + ([kernels.decode_layer] if _module() is not None else [])
    for decode in implementations:
        k_out, v_out = k_big.clone(), v_big.clone()
        y = decode(x, w["norm1"], w["qkv"], w["o"], w["norm2"], w["gate_up"], w["down"], 1e-5, cos, sin,
                   k_out, v_out, 0, H, K, None, lengths, rows)
        for i, (n, r) in enumerate(zip(lengths.tolist(), rows.tolist())):
            k_own, v_own = k_cache[i:i + 1].clone(), v_cache[i:i + 1].clone()
            alone = _run_layer(decode, x[i:i + 1], w, 1e-5, cos[i:i + 1], sin[i:i + 1], k_own, v_own, n, H, K, None)
            if decode is fallback.decode_layer:
                _close(y[i:i + 1], alone, 1e-5)
            else:
                assert torch.equal(y[i:i + 1], alone), (n, r)
            assert torch.equal(k_out[r, :, :n + 1], k_own[0, :, :n + 1])
            assert torch.equal(v_out[r, :, :n + 1], v_own[0, :, :n + 1])
            assert torch.equal(k_out[r, :, n + 1:], k_big[r, :, n + 1:])
        for idle in (1, 3):
            assert torch.equal(k_out[idle], k_big[idle]) and torch.equal(v_out[idle], v_big[idle])
    if _module() is not None:
        for bad, message in (((torch.tensor([800, 3, 130]), rows), "does not fit"),
                             ((lengths, torch.tensor([4, 5, 2])), "not among")):
            with pytest.raises(RuntimeError, match=message):
                kernels.decode_layer(x, w["norm1"], w["qkv"], w["o"], w["norm2"], w["gate_up"], w["down"], 1e-5,
                                     cos, sin, k_big.clone(), v_big.clone(), 0, H, K, None, *bad)


def test_forced_fallback_agrees_with_compiled(monkeypatch):
    _, weight = _weight(33, 608, 4, bias=False)
    x = torch.randn(3, 608)
    monkeypatch.setenv("POCKETLM_KERNELS", "off")
    assert kernels.compiled() is None
    forced = kernels.linear(x, *weight)
    torch.testing.assert_close(forced, fallback.linear(x, *weight), rtol=0, atol=0)
    monkeypatch.delenv("POCKETLM_KERNELS")
    with kernels.use_compiled(False):
        assert kernels.compiled() is None
    if _module() is None:
        pytest.skip("no compiled kernels to compare with")
    _close(kernels.linear(x, *weight), forced, 1e-5)
    layer_args = _layer_case(3, 9, 3, 40, torch.float16, True)
    x, w, cos, sin, k_cache, v_cache, key_mask = layer_args
    y = _run_layer(kernels.decode_layer, x, w, 1e-5, cos, sin, k_cache.clone(), v_cache.clone(), 40, 9, 3, key_mask)
    with kernels.use_compiled(False):
        y_fallback = _run_layer(kernels.decode_layer, x, w, 1e-5, cos, sin, k_cache.clone(), v_cache.clone(),
                                40, 9, 3, key_mask)
    _close(y, y_fallback, 2e-4)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_import_built", lambda name: None)
    monkeypatch.setenv("CXX", "no-such-compiler-pocketlm")
    _, weight = _weight(7, 64, 8)
    x = torch.randn(2, 64)
    with pytest.warns(RuntimeWarning, match="no-such-compiler.*fallback"):
        y = kernels.linear(x, *weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every call
        torch.testing.assert_close(kernels.linear(x, *weight), y, rtol=0, atol=0)
    torch.testing.assert_close(y, fallback.linear(x, *weight), rtol=0, atol=0)


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_live_one_is_kept(tmp_path, capsys):
    """torch's build waits on its lock file forever; a build killed mid-compile leaves one."""
    lock = tmp_path / "lock"
    lock.write_text("")
    assert not kernels._clear_stale_lock(str(tmp_path))  # fresh: a build may still be running
    assert lock.exists()
    old = lock.stat().st_mtime - kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert kernels._clear_stale_lock(str(tmp_path))
    assert not lock.exists() and "stale build lock" in capsys.readouterr().err
    assert not kernels._clear_stale_lock(str(tmp_path))  # nothing left to remove
