"""Reference values for antibody-canary's mathematics, computed with PyTorch.

What it produces
----------------
``tests/reference/fixtures/canary.json``: for two sites (widths 8 and 12), seeded
per-neuron means before and after, their drift ``|post - pre|``, the exact quantile
``torch.quantile(all_drifts, q)`` (linear interpolation), the canary indices (drift > threshold),
and for a batch of current activations ``[2, 5, w]`` with a token mask (row 1 padded after 3
tokens): the canaries' batch means over counted tokens, ``L_stab = mean((current - target)^2)``
and its gradient with respect to the activations.

How to run (from the repository root, venv from requirements.txt)
----------------------------------------------------------------
    python tests/reference/canary.py --out tests/reference/fixtures/canary.json
"""

import argparse
import json

import torch

WIDTHS = {"attn.0": 8, "mlp.1": 12}
Q = 0.9


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(1)
    out = {"q": Q, "sites": {}}
    drifts = []
    pre, post = {}, {}
    for site, w in WIDTHS.items():
        pre[site] = torch.randn(w)
        post[site] = pre[site] + torch.randn(w) * torch.rand(w)
        drifts.append((post[site] - pre[site]).abs())
    all_d = torch.cat(drifts)
    threshold = float(torch.quantile(all_d.double(), Q).item())
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0.0
    canaries, targets, means, leaves = {}, [], [], {}
    for (site, w), d in zip(WIDTHS.items(), drifts):
        idx = [int(i) for i in torch.nonzero(d.double() > threshold).reshape(-1).tolist()]
        canaries[site] = idx
        acts = (torch.randn(2, 5, w) * 2.0).requires_grad_(True)
        leaves[site] = acts
        out["sites"][site] = {
            "pre": flat(pre[site]),
            "post": flat(post[site]),
            "drift": flat(d),
            "canaries": idx,
            "current": flat(acts),
        }
        if idx:
            picked = acts[:, :, idx] * mask.unsqueeze(-1)
            means.append(picked.sum(dim=(0, 1)) / mask.sum())
            targets.append(post[site][idx])
    current = torch.cat(means)
    target = torch.cat(targets)
    loss = ((current - target) ** 2).mean()
    loss.backward()
    for site in WIDTHS:
        out["sites"][site]["grad"] = flat(leaves[site].grad)
    out["threshold"] = threshold
    out["mask"] = flat(mask)
    out["current_means"] = flat(current)
    out["stab_loss"] = float(loss.item())
    out["versions"] = {"torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump(out, f)
        f.write("\n")
    print(f"wrote {args.out}: threshold={threshold:.6f} canaries={ {k: len(v) for k, v in canaries.items()} } stab={loss.item():.6f}")


if __name__ == "__main__":
    main()
