"""PyTorch peer of `cargo xtask bench losses`: the alignment KL (``--term kl``: forward,
masked mean over positions) or NPO on the sequence log-probability (``--term logprob``), from
final hidden states through the output projection, forward and backward to the student's
hidden states and head, on the CPU in fp32 -- as one would write it in PyTorch eager
(materialized logits, F.log_softmax). Prints one JSON line: time and peak RSS.

    python bench/losses_peer.py [--term kl --batch 8 --seq 256 --vocab 49152 --hidden 576 --repeats 2]
"""

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--term", choices=["kl", "logprob"], default="kl")
    a = ap.parse_args()
    torch.manual_seed(0)
    b, t, v, d = a.batch, a.seq, a.vocab, a.hidden
    th = torch.randn(b, t, d)
    tw = torch.randn(v, d) * 0.1
    sh0 = torch.randn(b, t, d)
    sw0 = torch.randn(v, d) * 0.1
    mask = torch.ones(b, t)
    targets = (torch.arange(b * t) * 7919 % v).reshape(b, t)
    reference = torch.zeros(b)
    before = peak_rss()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    times = []
    value = 0.0
    for _ in range(a.repeats):
        sh = sh0.clone().requires_grad_(True)
        sw = sw0.clone().requires_grad_(True)
        start = time.perf_counter()
        if a.term == "kl":
            with torch.no_grad():
                lt = F.log_softmax(th @ tw.T, -1)
            ls = F.log_softmax(sh @ sw.T, -1)
            per = (lt.exp() * (lt - ls)).sum(-1)
            loss = (per * mask).sum() / mask.sum()
            del lt
        else:
            ls = F.log_softmax(sh @ sw.T, -1)
            s = (ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
            loss = -F.logsigmoid(0.1 * (reference - s)).mean()
        loss.backward()
        value = float(loss.item())
        times.append(time.perf_counter() - start)
        del ls, loss
    best = min(times)
    print(json.dumps({
        "variant": "pytorch",
        "term": a.term,
        "shape": [b, t, v],
        "hidden": d,
        "seconds": best,
        "times": times,
        "tokens_per_s": b * t / best,
        "peak_rss_bytes": peak_rss(),
        "rss_before_bytes": before,
        "peak_reset": reset,
        "value": value,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
