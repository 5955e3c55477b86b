"""torch's fp32 linear against oneDNN's on the weight in oneDNN's layout, one thread, per shape and row
count: the measurement behind the engine's default `linear_backend` (language_server/linear.py).

    python scripts/measure_linear_kernels.py            # 38b-scaled and 1B shapes
    taskset -c 0 python scripts/measure_linear_kernels.py
"""
import time

import torch

SHAPES = {"38b-scaled": [(256, 1280), (1280, 256), (256, 512)], "1b": [(1024, 3072), (3072, 1024), (1024, 2048)]}
ROWS = (1, 16, 64, 256, 512)


def cpu_seconds(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    start = time.thread_time()
    for _ in range(repeats):
        fn()
    return (time.thread_time() - start) / repeats


torch.set_num_threads(1)
with torch.inference_mode():
    for preset, shapes in SHAPES.items():
        for inputs, outputs in shapes:
            weight = torch.randn(outputs, inputs)
            onednn_weight = weight.to_mkldnn()
            for rows in ROWS:
                x = torch.randn(rows, inputs)
                plain = cpu_seconds(lambda x=x, w=weight: torch.nn.functional.linear(x, w))
                onednn = cpu_seconds(lambda x=x, w=onednn_weight: torch._C._nn.mkldnn_linear(x.to_mkldnn(), w, None)
                                     .to_dense())
                print(f"{preset:10s} {inputs:5d}->{outputs:<5d} rows {rows:4d}: torch {plain * 1e3:7.3f} ms, "
                      f"onednn {onednn * 1e3:7.3f} ms ({onednn / plain:.2f}x)")
