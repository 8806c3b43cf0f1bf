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

Same synthetic data as the Rust bench (a quarter prompt, the rest response). Tokens/s counts
batch x seq per step. Prints one JSON line.

    python bench/method_peer.py --phase harmful [--batch 4 --seq 128 --steps 3 --warmup 1
        --device cpu --dtype fp32 --lat-layers 8,16,24]
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
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    dev = torch.device(a.device)
    b, t = a.batch, a.seq
    p = max(t // 4, 1)
    g = torch.Generator().manual_seed(0)
    def seqs():
        ids = torch.randint(3, 49003, (b, t), generator=g)
        ids[:, 0] = 1
        return ids.to(dev)
    mask = torch.zeros(b, t, device=dev)
    mask[:, p - 1 : t - 1] = 1.0  # targets i+1 in the response
    att = torch.ones(b, t, dtype=torch.long, device=dev)
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

    def slogp(logits, ids):
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (lp * mask[:, :-1]).sum(-1)

    h_ids, c_ids, r_ids = seqs(), seqs(), seqs()
    with torch.no_grad():
        ref_h = slogp(teacher(input_ids=h_ids, attention_mask=att).logits, h_ids)
        ref_c = slogp(teacher(input_ids=c_ids, attention_mask=att).logits, c_ids)
        ref_r = slogp(teacher(input_ids=r_ids, attention_mask=att).logits, r_ids)
    rng = torch.Generator().manual_seed(1)
    canaries = {}
    for i in range(n_layers):
        canaries[("attn", i)] = torch.randperm(576, generator=rng)[:6].to(dev)
        canaries[("mlp", i)] = torch.randperm(1536, generator=rng)[:15].to(dev)
    target = {k: torch.zeros(len(v), device=dev) for k, v in canaries.items()}

    def harmful_step():
        deltas.clear()
        leaves = {i: torch.zeros(b, t, 576, device=dev, dtype=dtype, requires_grad=True) for i in layers}
        deltas.update(leaves)
        logits = student(input_ids=h_ids, attention_mask=att).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, h_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        attack = -(lp * mask[:, :-1]).sum() / mask.sum()
        grads = torch.autograd.grad(attack, list(leaves.values()))
        for (i, _), gr in zip(leaves.items(), grads):
            n = gr.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            deltas[i] = (-1.0 * gr / n).detach()
        logits = student(input_ids=h_ids, attention_mask=att).logits
        deltas.clear()
        s = slogp(logits, h_ids)
        npo = -F.logsigmoid(0.1 * (ref_h - s)).mean()
        with torch.no_grad():
            lt = torch.log_softmax(teacher(input_ids=h_ids, attention_mask=att).logits[:, :-1].float(), -1)
        ls = torch.log_softmax(logits[:, :-1].float(), -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        kl = torch.where(kl > 10.0, kl.detach().clamp(max=10.0), kl)
        kl_imm = -(kl * mask[:, :-1]).sum() / mask.sum()
        return 0.5 * npo + 0.5 * kl_imm

    def harmless_step():
        capture[0] = True
        logits = student(input_ids=c_ids, attention_mask=att).logits
        capture[0] = False
        s_c = slogp(logits, c_ids)
        s_r = slogp(student(input_ids=r_ids, attention_mask=att).logits, r_ids)
        dpo = -F.logsigmoid(0.1 * ((s_c - ref_c) - (s_r - ref_r))).mean()
        with torch.no_grad():
            lt = torch.log_softmax(teacher(input_ids=c_ids, attention_mask=att).logits[:, :-1].float(), -1)
        ls = torch.log_softmax(logits[:, :-1].float(), -1)
        kl = ((lt.exp() * (lt - ls)).sum(-1) * mask[:, :-1]).sum() / mask.sum()
        cur = torch.cat([captured[k].float().mean((0, 1))[idx] for k, idx in canaries.items()])
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
    for k in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if k >= a.warmup:
            total += time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss()
    print(json.dumps({
        "impl": "pytorch", "phase": a.phase, "device": a.device, "dtype": a.dtype,
        "batch": b, "seq": t, "steps": a.steps,
        "seconds_per_step": total / a.steps, "tokens_per_s": a.steps * b * t / total,
        "peak_bytes": peak, "peak_reset": reset, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
