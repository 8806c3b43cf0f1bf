"""PyTorch peer of the GEMM rows of `cargo xtask bench method`: f32 `torch.matmul` of
contiguous `[m, k] · [k, n]` on the patient's shapes (the same list as `antibody-model gemm`),
best of `--repeats` after two warm-ups. Prints one JSON line with GFLOP/s per shape.

    python bench/gemm_peer.py [--m 512 --repeats 10 --threads 2]
"""

import argparse
import json
import time

import torch

SHAPES = [
    (576, 576, "q/o projection"),
    (576, 192, "k/v projection"),
    (576, 1536, "gate/up projection"),
    (1536, 576, "down projection"),
    (576, 8192, "head, one vocabulary chunk"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for k, n, what in SHAPES:
        x = torch.rand(a.m, k, generator=g) * 2 - 1
        w = torch.rand(k, n, generator=g) * 2 - 1
        best = float("inf")
        for i in range(a.repeats + 2):
            start = time.perf_counter()
            torch.matmul(x, w)
            if i >= 2:
                best = min(best, time.perf_counter() - start)
        rows.append({"m": a.m, "k": k, "n": n, "what": what, "seconds": best,
                     "gflops": 2.0 * a.m * k * n / best / 1e9})
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "shapes": rows}))


if __name__ == "__main__":
    main()
