"""Timings of the kernels on SmolLM2-135M shapes with random int4 weights (not a test):
    python -m pocketlm.kernels._measure [threads]"""

import sys
import time

import torch
import torch.nn.functional as F

from pocketlm import kernels
from pocketlm.quant import quantize

C, H, K, D, I, LAYERS = 576, 9, 3, 64, 1536, 30


def best_us(fn, repeats=30):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 5] * 1e6  # a low quantile: the machine may be shared


def main(threads: int = 2) -> None:
    start = time.perf_counter()
    module = kernels.compiled()
    print(f"kernels: {module.path if module else 'fallback'}, loaded in {time.perf_counter() - start:.2f} s")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = {"qkv": ((H + 2 * K) * D, C), "o": (C, H * D), "gate_up": (2 * I, C), "down": (C, I)}
    layers = {name: quantize(torch.randn(shape) * 0.05, 4) for name, shape in shapes.items()}
    weights = {name: layer.kernel_blocks() for name, layer in layers.items()}
    for M in (1, 8):
        total_q = total_f = 0.0
        for name, (out, features) in shapes.items():
            x, dense = torch.randn(M, features), layers[name].dequantize()
            q, scale, offset, tiles = weights[name]
            q_us = best_us(lambda: kernels.linear(x, q, scale, offset, None, tiles))
            f_us = best_us(lambda: F.linear(x, dense))
            total_q, total_f = total_q + q_us, total_f + f_us
            print(f"M={M} {name:8s} ({out}x{features}): int4 {q_us:7.1f} µs  fp32 F.linear {f_us:7.1f} µs")
        print(f"M={M} per layer: int4 {total_q:.0f} µs, fp32 {total_f:.0f} µs (fp32/int4 {total_f / total_q:.2f}×); "
              f"{LAYERS} layers of products alone: {1e6 / (total_q * LAYERS):.0f} steps/s")
    norm = torch.ones(C)
    for B in (1, 8):
        for n in (200, 1000):
            for cache_dtype in (torch.float32, torch.float16):
                x = torch.randn(B, C)
                cos, sin = torch.randn(B, D), torch.randn(B, D)
                k_cache = torch.randn(B, K, 1100, D).to(cache_dtype)
                v_cache = torch.randn(B, K, 1100, D).to(cache_dtype)
                us = best_us(lambda: kernels.decode_layer(x, norm, weights["qkv"], weights["o"], norm,
                                                          weights["gate_up"], weights["down"], 1e-5, cos, sin,
                                                          k_cache, v_cache, n, H, K))
                print(f"decode_layer B={B} n={n} {str(cache_dtype)[6:]} cache: {us:.0f} µs "
                      f"→ {1e6 / (us * LAYERS):.0f} steps/s of {LAYERS} layers ({B * 1e6 / (us * LAYERS):.0f} tok/s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
