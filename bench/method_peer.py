"""PyTorch peer of `cargo xtask bench method`: the method's two training steps written as the
paper's authors would in PyTorch eager, on random weights of the patient's architecture
(SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied embeddings).

* harmful step: one LAT step (delta = -eps * g/||g|| per token at the residual stream after
  the chosen layers, from the CE of y_h), then under delta
  L_adv = 0.5 * NPO(s_H(y_h) cached vs s(y_h)) + 0.5 * (-mean min(KL(pi_H || pi), 10)),
  backward, global-norm clipping at 1, AdamW;
* harmless step: L = 0.5 * DPO(y_c > y_r; reference log-probs cached) + 0.5 * KL(pi_B || pi)
  + MSE(canary means, targets) with the canaries (1% of attn/mlp neurons) read by forward
  hooks of the same forward, backward, clipping, AdamW.

Same synthetic data as the Rust bench (a quarter prompt, the rest response), or, with
`--batches FILE` (written by `antibody-train bench --batches-out`), the very examples each of
antibody's steps read: every role's sequences right-padded to that batch's longest row, as
the paper's authors would, with `--rho` adding the refusal SFT term on `x ++ y_ref`
(unperturbed) to the harmful step. Tokens/s counts batch x seq per step (synthetic) or the
real tokens of every sequence a step reads (`--batches`). Prints one JSON line.

    python bench/method_peer.py --phase harmful [--batch 4 --seq 128 --steps 3 --warmup 1
        --device cpu --dtype fp32 --lat-layers 8,16,24 --batches FILE --rho 2]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def model(seed, dtype, device):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=2048, pad_token_id=2, bos_token_id=1,
                      eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["harmful", "harmless"], required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--lat-layers", default="8,16,24")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--rho", type=float, default=0.0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    dev = torch.device(a.device)
    b, t = a.batch, a.seq
    p = max(t // 4, 1)
    g = torch.Generator().manual_seed(0)

    class Batch:
        """Right-padded ids, attention mask and response-target mask (target i+1)."""

        def __init__(self, ids, att, mask):
            self.ids, self.att, self.mask = ids.to(dev), att.to(dev), mask.to(dev)
            self.real = int(att.sum())

    def synthetic():
        ids = torch.randint(3, 49003, (b, t), generator=g)
        ids[:, 0] = 1
        mask = torch.zeros(b, t)
        mask[:, p - 1 : t - 1] = 1.0
        return Batch(ids, torch.ones(b, t, dtype=torch.long), mask)

    def padded(seqs):
        n, L = len(seqs), max(len(e["ids"]) for e in seqs)
        ids = torch.full((n, L), 2, dtype=torch.long)
        att = torch.zeros(n, L, dtype=torch.long)
        mask = torch.zeros(n, L)
        for r, e in enumerate(seqs):
            k = len(e["ids"])
            ids[r, :k] = torch.tensor(e["ids"])
            att[r, :k] = 1
            resp = torch.tensor(e["response_mask"][1:], dtype=torch.float32)
            mask[r, : k - 1] = resp
        return Batch(ids, att, mask)

    if a.batches:
        with open(a.batches) as f:
            doc = json.load(f)
        steps = []
        for st in doc["steps"]:
            by_role = {}
            for e in st["sequences"]:
                by_role.setdefault(e["role"], []).append(e)
            steps.append({role: padded(v) for role, v in by_role.items()})
        a.steps = len(steps) - a.warmup
    else:
        one = {"harmful": synthetic(), "chosen": synthetic(), "rejected": synthetic()}
        steps = [one] * (a.warmup + a.steps)
    student = model(1, dtype, dev)
    teacher = model(2 if a.phase == "harmful" else 1, dtype, dev)
    for q in teacher.parameters():
        q.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    layers = [int(x) for x in a.lat_layers.split(",")]
    deltas = {}
    for i in layers:
        def hook(_m, _inp, out, i=i):
            if i in deltas:
                h = (out[0] if isinstance(out, tuple) else out) + deltas[i]
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            return None
        student.model.layers[i].register_forward_hook(hook)
    captured = {}
    capture = [False]
    n_layers = len(student.model.layers)
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.o_proj.register_forward_hook(
            lambda _m, _i, out, i=i: captured.__setitem__(("attn", i), out) if capture[0] else None)
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, inp, i=i: captured.__setitem__(("mlp", i), inp[0]) if capture[0] else None)

    def slogp(logits, bt):
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, bt.ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (lp * bt.mask[:, :-1]).sum(-1)

    def fwd(m, bt):
        return m(input_ids=bt.ids, attention_mask=bt.att).logits

    # The teachers' sequence log-probabilities, computed once before timing (as antibody's
    # TeacherCache does).
    refs = []
    with torch.no_grad():
        for st in steps:
            refs.append({role: slogp(fwd(teacher, bt), bt) for role, bt in st.items()
                         if role in ("harmful", "chosen", "rejected")})
    rng = torch.Generator().manual_seed(1)
    canaries = {}
    for i in range(n_layers):
        canaries[("attn", i)] = torch.randperm(576, generator=rng)[:6].to(dev)
        canaries[("mlp", i)] = torch.randperm(1536, generator=rng)[:15].to(dev)
    target = {k: torch.zeros(len(v), device=dev) for k, v in canaries.items()}

    def harmful_step(st, ref):
        h = st["harmful"]
        hb, ht = h.ids.shape
        deltas.clear()
        leaves = {i: torch.zeros(hb, ht, 576, device=dev, dtype=dtype, requires_grad=True) for i in layers}
        deltas.update(leaves)
        logits = fwd(student, h)
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, h.ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        attack = -(lp * h.mask[:, :-1]).sum() / h.mask.sum()
        grads = torch.autograd.grad(attack, list(leaves.values()))
        for (i, _), gr in zip(leaves.items(), grads):
            n = gr.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            deltas[i] = (-1.0 * gr / n).detach()
        logits = fwd(student, h)
        deltas.clear()
        s = slogp(logits, h)
        npo = -F.logsigmoid(0.1 * (ref["harmful"] - s)).mean()
        with torch.no_grad():
            lt = torch.log_softmax(fwd(teacher, h)[:, :-1].float(), -1)
        ls = torch.log_softmax(logits[:, :-1].float(), -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        kl = torch.where(kl > 10.0, kl.detach().clamp(max=10.0), kl)
        kl_imm = -(kl * h.mask[:, :-1]).sum() / h.mask.sum()
        loss = 0.5 * npo + 0.5 * kl_imm
        if a.rho > 0 and "refusal" in st:
            r = st["refusal"]
            lr_ = torch.log_softmax(fwd(student, r)[:, :-1].float(), -1).gather(-1, r.ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            loss = loss + a.rho * (-(lr_ * r.mask[:, :-1]).sum() / r.mask.sum())
        return loss

    def harmless_step(st, ref):
        c, r = st["chosen"], st["rejected"]
        capture[0] = True
        logits = fwd(student, c)
        capture[0] = False
        s_c = slogp(logits, c)
        s_r = slogp(fwd(student, r), r)
        dpo = -F.logsigmoid(0.1 * ((s_c - ref["chosen"]) - (s_r - ref["rejected"]))).mean()
        with torch.no_grad():
            lt = torch.log_softmax(fwd(teacher, c)[:, :-1].float(), -1)
        ls = torch.log_softmax(logits[:, :-1].float(), -1)
        kl = ((lt.exp() * (lt - ls)).sum(-1) * c.mask[:, :-1]).sum() / c.mask.sum()
        cur = torch.cat([(captured[k].float() * c.att.unsqueeze(-1)).sum((0, 1))[idx] / c.att.sum()
                         for k, idx in canaries.items()])
        tgt = torch.cat([target[k] for k in canaries])
        stab = ((cur - tgt) ** 2).mean()
        return 0.5 * dpo + 0.5 * kl + stab

    step = harmful_step if a.phase == "harmful" else harmless_step
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = 0.0
    step_seconds, real = [], 0
    for k in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step(steps[k], refs[k])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if k >= a.warmup:
            dt = time.perf_counter() - start
            total += dt
            step_seconds.append(dt)
            real += sum(bt.real for role, bt in steps[k].items()
                        if a.phase == "harmless" or role == "harmful" or a.rho > 0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss()
    tokens = real if a.batches else a.steps * b * t
    print(json.dumps({
        "impl": "pytorch", "phase": a.phase, "device": a.device, "dtype": a.dtype,
        "batch": b, "seq": None if a.batches else t, "steps": a.steps,
        "seconds_per_step": total / a.steps, "step_seconds": step_seconds,
        "real_tokens": tokens, "tokens_per_s": tokens / total,
        "peak_bytes": peak, "peak_reset": reset, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
