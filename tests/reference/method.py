"""Reference trajectory of the method's training loop on the tiny model (PyTorch eager).

What it produces
----------------
``tests/reference/fixtures/method.json``: the data (token ids and response masks of 4
harmful examples ``x ++ y_h`` / ``x ++ y_ref`` and 4 harmless ``x ++ y_c`` / ``x ++ y_r``),
the settings, and for every optimizer step of the run the loss terms the Rust side records
(``crates/antibody-train/tests/trajectory.rs`` compares them), plus the canary count of
every cycle.

The run, written as the method's authors would in PyTorch:

* student = tiny model seed 0, harmful teacher = seed 1, benign teacher = seed 0 (frozen);
* 2 cycles of: A_pre (mean activations of every layer's attention output and MLP hidden
  activation over the harmful prompts' tokens) -> 2 harmful steps -> A_post, drift, canaries
  = drift > quantile q, A_target on the harmless x ++ y_c (the tokens A_current averages
  over) -> 2 harmless steps;
* harmful step: PGD LAT (2 steps, alpha = 2.5 eps / steps, per-token L2 ball of radius eps)
  at the residual stream after layers 1 and 2, attack loss = CE of y_h; then under delta
  L_adv = (1-g) NPO(s_H(y_h) vs s(y_h)) + g (-mean min(KL(pi_H||pi), cap)) + rho SFT(y_ref),
  the x ++ y_ref forward under the same delta on its prompt positions (METHOD.md, LAT step 4);
* harmless step: L = (1-a) DPO(y_c > y_r, ref pi_B) + a KL(pi_B||pi) + lam MSE(canary means);
* AdamW (PyTorch defaults: eps 1e-8, weight decay 0.01), global-norm clipping at 1.0
  (scale max/(norm+1e-6)), lr with 1 warmup step then cosine to 0 over the run's 8 steps.

Two variants, each its own fixture (``VARIANTS``): ``method_per_phase.json`` gives each phase
its own AdamW (moments kept across cycles) and restarts the schedule (warmup + cosine) in every
phase block; ``method_reset.json`` starts every phase block with fresh AdamW moments, restarts
the schedule every cycle, and trains the refusal term without delta; ``method_canary_pre.json``
takes A_target from the model before each harmful phase and scales each site's drift by the
root mean square of its A_pre; ``method_retain.json`` adds a retain term (0.5 KL(pi_B||pi) on
the harmless answers, unperturbed) to every harmful step and runs DPO on per-token means;
``method_relative_eps.json`` measures epsilon (and the step size) as a fraction of each token's
residual norm at the site; ``method_away.json`` runs the refusal term under the prompt's delta
plus a second PGD attack on the refusal's own positions that makes y_ref unlikely;
``method_contrast.json`` adds to every harmful step a contrast term beside a retain term
(0.25), both on the harmless rows, unperturbed, from one forward of x ++ y_c: DPO of y_c
over the refusal the step teaches (row j of the step's harmless batch is paired with row j
of its harmful batch, whose y_ref response follows the harmless prompt), reference pi_B,
weight 1, with DPO's beta at 1 so the term leaves log 2 within a step and a wrong pairing
shows; the pairing follows the Rust side's seeded batch orders (``order``);
``method_contrast_rank.json`` has the contrast's rank form instead, -log sigmoid(beta (s(y_ref |
x_h) - s(y_ref | x_l))) over the same pairs, the x_h side under the refusal term's delta, the
x_l side unperturbed (beta 0.5, weight 1, no retain term).

Every batch is the whole set (batch size 4 = examples), so the order of rows does not matter
(every loss is a mean over rows or counted tokens).

How to run (from the repository root, venv from requirements.txt)
----------------------------------------------------------------
    HF_HUB_OFFLINE=1 python tests/reference/method.py [FIXTURE.json ...]

Tolerances the Rust test uses: step 0 terms relative 1e-4; later steps relative 2e-3
(float differences compound through AdamW updates); canary counts exact.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tiny import build_model, layer_output_tensor

PAD = 2
SETTINGS = dict(
    cycles=2,
    harmful_steps=2,
    harmless_steps=2,
    batch_size=4,
    lr=2e-3,
    warmup_steps=1,
    max_grad_norm=1.0,
    weight_decay=0.01,
    eps_adam=1e-8,
    betas=[0.9, 0.999],
    npo_beta=0.1,
    gamma=0.5,
    kl_cap=0.3,
    rho=0.5,
    dpo_beta=0.1,
    alpha=0.5,
    lambda_stab=1.0,
    lat_layers=[1, 2],
    lat_epsilon=0.5,
    lat_steps=2,
    q=0.9,
    lat_refusal="prompt",
    optimizer_state="shared",
    lr_scope="run",
    canary_target="post",
    canary_drift="absolute",
    retain=0.0,
    contrast=0.0,
    contrast_loss="dpo",
    dpo_length_normalized=False,
    lat_epsilon_scale="absolute",
)

# Variants of the default run, each its own fixture: how the refusal term sees delta and how
# the optimizer carries state and rate across phase boundaries (METHOD.md, LAT step 4 and
# Schedules).
VARIANTS = {
    "method.json": {},
    "method_per_phase.json": dict(optimizer_state="per_phase", lr_scope="phase"),
    "method_reset.json": dict(optimizer_state="reset", lr_scope="cycle", lat_refusal="none"),
    "method_canary_pre.json": dict(canary_target="pre", canary_drift="normalized"),
    "method_retain.json": dict(retain=0.5, dpo_length_normalized=True),
    "method_relative_eps.json": dict(lat_epsilon_scale="relative", lat_epsilon=0.05),
    "method_away.json": dict(lat_refusal="away"),
    "method_contrast.json": dict(retain=0.25, contrast=1.0, dpo_beta=1.0),
    "method_contrast_rank.json": dict(contrast=1.0, contrast_loss="rank", dpo_beta=0.5),
}


HARMFUL_SALT = 0x4841_524D  # crates/antibody-train/src/data.rs
RETAIN_SALT = 0x5245_5441
MASK64 = (1 << 64) - 1


def splitmix64(x):
    z = (x + 0x9E37_79B9_7F4A_7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & MASK64
    return z ^ (z >> 31)


def order(n, seed, length):
    """antibody_finetune::order: seeded passes of Fisher-Yates permutations, cut to length."""
    out, p = [], 0
    while len(out) < length and n > 0:
        perm = list(range(n))
        state = splitmix64(seed ^ ((p * 0x9E37_79B9_7F4A_7C15) & MASK64))
        for i in range(n - 1, 0, -1):
            state = splitmix64(state)
            j = state % (i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        out.extend(perm)
        p += 1
    return out[:length]


def make_data():
    rng = np.random.default_rng(20261123)

    def seq(p, r):
        prompt = [1] + rng.integers(3, 49152, size=p - 1).tolist()
        resp = rng.integers(3, 49152, size=r).tolist()
        return prompt, prompt + resp, [False] * p + [True] * r

    harmful, harmless = [], []
    for _ in range(4):
        p = int(rng.integers(5, 8))
        prompt, h, hm = seq(p, int(rng.integers(4, 7)))
        ref = prompt + rng.integers(3, 49152, size=int(rng.integers(3, 6))).tolist()
        harmful.append(dict(prompt=prompt, y_h=h, y_h_mask=hm, y_ref=ref,
                            y_ref_mask=[False] * p + [True] * (len(ref) - p)))
    for _ in range(4):
        p = int(rng.integers(5, 8))
        prompt, c, cm = seq(p, int(rng.integers(4, 7)))
        r = prompt + rng.integers(3, 49152, size=int(rng.integers(3, 6))).tolist()
        harmless.append(dict(prompt=prompt, y_c=c, y_c_mask=cm, y_r=r,
                             y_r_mask=[False] * p + [True] * (len(r) - p)))
    return harmful, harmless


def batch(seqs, masks):
    """Right-padded ids, attention mask, next-token targets and their response mask."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    att = torch.zeros((len(seqs), t), dtype=torch.long)
    tgt = torch.full((len(seqs), t), PAD, dtype=torch.long)
    m = torch.zeros((len(seqs), t))
    for b, (s, sm) in enumerate(zip(seqs, masks)):
        ids[b, : len(s)] = torch.tensor(s)
        att[b, : len(s)] = 1
        for i in range(1, len(s)):
            tgt[b, i - 1] = s[i]
            m[b, i - 1] = 1.0 if sm[i] else 0.0
    return ids, att, tgt, m


class Sites:
    """Forward hooks: add deltas after decoder layers, capture attn/mlp activations."""

    def __init__(self, model):
        self.model = model
        self.deltas = {}
        self.captured = {}
        self.capture = False
        self.residuals = {}
        self.capture_resid = False
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_hook(self._resid(i))
            layer.self_attn.o_proj.register_forward_hook(self._out(("attn", i)))
            layer.mlp.down_proj.register_forward_pre_hook(self._pre(("mlp", i)))

    def _resid(self, i):
        def hook(_m, _inp, out):
            if self.capture_resid and i in self.deltas:
                self.residuals[i] = layer_output_tensor(out).detach()
            if i in self.deltas:
                h = layer_output_tensor(out) + self.deltas[i]
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            return None
        return hook

    def _out(self, key):
        def hook(_m, _inp, out):
            if self.capture:
                self.captured[key] = out
        return hook

    def _pre(self, key):
        def hook(_m, inp):
            if self.capture:
                self.captured[key] = inp[0]
        return hook


def logits_of(model, ids, att):
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=att, position_ids=pos).logits.float()


def seq_logprob(logits, tgt, m):
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return (lp * m).sum(-1)


def kl_forward(teacher_logits, student_logits):
    """KL(teacher || student) per position."""
    lt = torch.log_softmax(teacher_logits, -1)
    ls = torch.log_softmax(student_logits, -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def activations_mean(model, sites, prompts):
    ids, att, _, _ = batch(prompts, [[False] * len(p) for p in prompts])
    sites.capture = True
    with torch.no_grad():
        logits_of(model, ids, att)
    sites.capture = False
    w = att.unsqueeze(-1).double()
    n = att.sum().double()
    return {k: ((v.double() * w).sum((0, 1)) / n).float() for k, v in sites.captured.items()}


def order_key(key):
    kind, layer = key
    return (layer, 0 if kind == "attn" else 1)


def lr_at(step, total, s):
    if step < s["warmup_steps"]:
        return s["lr"] * (step + 1) / s["warmup_steps"]
    span = max(total - s["warmup_steps"], 1)
    done = (step - s["warmup_steps"]) / max(span - 1, 1)
    done = min(max(done, 0.0), 1.0)
    return s["lr"] * 0.5 * (1.0 + math.cos(math.pi * done))


def main():
    torch.set_num_threads(2)
    # Fixture names on the command line regenerate those only.
    names = sys.argv[1:] or list(VARIANTS)
    for name in names:
        run(name, dict(SETTINGS, **VARIANTS[name]))


def prompt_shared(deltas, harmful, t):
    """delta for x ++ y_ref: delta of x ++ y_h on each row's prompt positions, 0 elsewhere."""
    out = {}
    for l, d in deltas.items():
        r = torch.zeros(d.shape[0], t, d.shape[2])
        for b, e in enumerate(harmful):
            p = len(e["prompt"])
            r[b, :p] = d[b, :p]
        out[l] = r
    return out


def run(name, s):
    harmful, harmless = make_data()
    student, _ = build_model(0)
    harmful_teacher, _ = build_model(1)
    benign_teacher, _ = build_model(0)
    for t in (harmful_teacher, benign_teacher):
        for p in t.parameters():
            p.requires_grad_(False)
    student.train(False)  # no dropout in Llama; eval mode keeps the attention path fixed
    sites = Sites(student)

    H = batch([e["y_h"] for e in harmful], [e["y_h_mask"] for e in harmful])
    R = batch([e["y_ref"] for e in harmful], [e["y_ref_mask"] for e in harmful])
    C = batch([e["y_c"] for e in harmless], [e["y_c_mask"] for e in harmless])
    Rj = batch([e["y_r"] for e in harmless], [e["y_r_mask"] for e in harmless])
    with torch.no_grad():
        sh_H = seq_logprob(logits_of(harmful_teacher, H[0], H[1]), H[2], H[3])
        sb_C = seq_logprob(logits_of(benign_teacher, C[0], C[1]), C[2], C[3])
        sb_R = seq_logprob(logits_of(benign_teacher, Rj[0], Rj[1]), Rj[2], Rj[3])
        th_logits = logits_of(harmful_teacher, H[0], H[1])
        tb_logits = logits_of(benign_teacher, C[0], C[1])

    def dpo_margin(s_c, s_r, cm, rm):
        """DPO's margin against pi_B, on per-token means under dpo_length_normalized."""
        if s["dpo_length_normalized"]:
            return (s_c - sb_C) / cm.sum(-1) - (s_r - sb_R) / rm.sum(-1)
        return (s_c - sb_C) - (s_r - sb_R)

    params = list(student.parameters())
    # The Rust side's seeded batch orders (seed 0): the harmful batches, and the harmless rows
    # the harmful steps' retain and contrast terms read.
    n_harmful_steps = s["cycles"] * s["harmful_steps"]
    harmful_order = order(len(harmful), HARMFUL_SALT, n_harmful_steps * s["batch_size"])
    retain_order = order(len(harmless), RETAIN_SALT, n_harmful_steps * s["batch_size"])
    hk = 0  # the run's harmful step

    def paired_refusals(by_harmless):
        """x_l ++ y_ref of the harmful step hk's pairs (row j of its harmless batch with row j
        of its harmful batch), batched in the order of the harmless (by_harmless) or the
        harmful examples."""
        bs = s["batch_size"]
        pairs = list(zip(retain_order[hk * bs:(hk + 1) * bs],
                         harmful_order[hk * bs:(hk + 1) * bs]))
        pairs.sort(key=lambda lh: lh[0] if by_harmless else lh[1])
        seqs, masks = [], []
        for l, h in pairs:
            x_l, e = harmless[l]["prompt"], harmful[h]
            p = len(e["prompt"])
            seqs.append(x_l + e["y_ref"][p:])
            masks.append([False] * len(x_l) + e["y_ref_mask"][p:])
        return batch(seqs, masks)

    def adamw():
        return torch.optim.AdamW(params, lr=s["lr"], betas=tuple(s["betas"]),
                                 eps=s["eps_adam"], weight_decay=s["weight_decay"])

    # shared: one AdamW; per_phase: one per phase, each keeping its moments across cycles;
    # reset: fresh moments at the first step of every phase block.
    opts = {"harmful": adamw(), "harmless": adamw()}
    if s["optimizer_state"] == "shared":
        opts["harmless"] = opts["harmful"]
    total = s["cycles"] * (s["harmful_steps"] + s["harmless_steps"])
    steps, canaries = [], []
    step = 0
    canary_idx, target = None, None
    last_phase = None

    def schedule(phase, cycle, k):
        """(index, length) of the step within the span the learning-rate schedule runs over."""
        if s["lr_scope"] == "run":
            return step, total
        if s["lr_scope"] == "cycle":
            per = s["harmful_steps"] + s["harmless_steps"]
            return step - cycle * per, per
        return k, s["harmful_steps"] if phase == "harmful" else s["harmless_steps"]

    def finish(loss, row, k):
        nonlocal step, last_phase
        phase = row["phase"]
        if s["optimizer_state"] == "reset" and phase != last_phase:
            opts[phase] = adamw()
        last_phase = phase
        opt = opts[phase]
        opt.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
        norm = float(norm)
        if norm > s["max_grad_norm"]:
            f = s["max_grad_norm"] / (norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(f)
        lr = lr_at(*schedule(phase, row["cycle"], k), s)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        row.update(step=step, loss=float(loss), grad_norm=norm, lr=lr)
        steps.append(row)
        step += 1

    for cycle in range(s["cycles"]):
        pre = activations_mean(student, sites, [e["prompt"] for e in harmful])
        # A_target from the model before the harmful phase (canary_target = "pre").
        harmless_pre = activations_mean(student, sites, [e["y_c"] for e in harmless])
        for k in range(s["harmful_steps"]):
            ids, att, tgt, m = H
            positions = att.unsqueeze(-1).float()
            eps, n_steps = s["lat_epsilon"], s["lat_steps"]
            alpha = 2.5 * eps / n_steps
            deltas = {l: torch.zeros(ids.shape[0], ids.shape[1], 64) for l in s["lat_layers"]}
            lat_losses = []
            radius = {l: eps for l in deltas}
            step_size = {l: alpha for l in deltas}
            for i_step in range(n_steps):
                leaves = {l: d.detach().requires_grad_(True) for l, d in deltas.items()}
                sites.deltas = leaves
                sites.capture_resid = i_step == 0
                lg = logits_of(student, ids, att)
                sites.capture_resid = False
                if i_step == 0:
                    # each token's residual norm at the site, from the unperturbed forward
                    norms = {l: sites.residuals[l].norm(dim=-1, keepdim=True) for l in deltas}
                    resid_norm = sum(float((norms[l] * positions).sum() / positions.sum())
                                     for l in deltas) / len(deltas)
                    if s["lat_epsilon_scale"] == "relative":
                        radius = {l: eps * norms[l] for l in deltas}
                        step_size = {l: alpha * norms[l] for l in deltas}
                lp = torch.log_softmax(lg, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                attack = -(lp * m).sum() / m.sum()
                lat_losses.append(float(attack))
                grads = torch.autograd.grad(attack, list(leaves.values()))
                new = {}
                for (l, leaf), g in zip(leaves.items(), grads):
                    norm = g.norm(dim=-1, keepdim=True)
                    unit = g / norm.clamp_min(1e-30) * (norm > 0).float()
                    d = leaf.detach() - unit * step_size[l]
                    dn = d.norm(dim=-1, keepdim=True)
                    d = d * (radius[l] / dn.clamp_min(1e-30)).clamp(max=1.0)
                    new[l] = d * positions
                deltas = new
            sites.deltas = {l: d.detach() for l, d in deltas.items()}
            lg = logits_of(student, ids, att)
            sites.deltas = {}
            s_h = seq_logprob(lg, tgt, m)
            npo = -F.logsigmoid(s["npo_beta"] * (sh_H - s_h)).mean()
            kl = kl_forward(th_logits, lg)
            counted = m > 0
            capped = torch.where(kl > s["kl_cap"], torch.full_like(kl, s["kl_cap"]), kl)
            # no gradient where the cap binds
            capped = torch.where(kl > s["kl_cap"], capped.detach(), capped)
            kl_imm = -(capped * m).sum() / m.sum()
            cap_rate = float((kl[counted] > s["kl_cap"]).float().mean())
            rids, ratt, rtgt, rm = R
            if s["lat_refusal"] == "prompt":
                sites.deltas = prompt_shared(deltas, harmful, rids.shape[1])
            if s["lat_refusal"] == "away":
                # the prompt's delta held in place; PGD on the refusal's response positions
                # that makes y_ref unlikely (ascends its CE), in the same ball
                fixed = prompt_shared(deltas, harmful, rids.shape[1])
                resp = torch.zeros(rids.shape[0], rids.shape[1], 1)
                for b, e in enumerate(harmful):
                    for i, flag in enumerate(e["y_ref_mask"]):
                        resp[b, i, 0] = 1.0 if flag else 0.0
                rnorms = None
                away = {l: torch.zeros_like(d) for l, d in fixed.items()}
                for i_step in range(n_steps):
                    leaves = {l: d.detach().requires_grad_(True) for l, d in away.items()}
                    sites.deltas = {l: fixed[l] + leaves[l] for l in leaves}
                    sites.capture_resid = i_step == 0
                    lg_r = logits_of(student, rids, ratt)
                    sites.capture_resid = False
                    if i_step == 0:
                        rnorms = {l: sites.residuals[l].norm(dim=-1, keepdim=True) for l in leaves}
                    rad = {l: (eps * rnorms[l] if s["lat_epsilon_scale"] == "relative" else eps)
                           for l in leaves}
                    stp = {l: (alpha * rnorms[l] if s["lat_epsilon_scale"] == "relative" else alpha)
                           for l in leaves}
                    lp = torch.log_softmax(lg_r, -1).gather(-1, rtgt.unsqueeze(-1)).squeeze(-1)
                    ce = -(lp * rm).sum() / rm.sum()
                    grads = torch.autograd.grad(ce, list(leaves.values()))
                    new = {}
                    for (l, leaf), g in zip(leaves.items(), grads):
                        norm = g.norm(dim=-1, keepdim=True)
                        unit = g / norm.clamp_min(1e-30) * (norm > 0).float()
                        d = leaf.detach() + unit * stp[l]
                        dn = d.norm(dim=-1, keepdim=True)
                        d = d * (rad[l] / dn.clamp_min(1e-30)).clamp(max=1.0)
                        new[l] = d * resp
                    away = new
                sites.deltas = {l: (fixed[l] + away[l]).detach() for l in away}
            s_ref = seq_logprob(logits_of(student, rids, ratt), rtgt, rm)
            sites.deltas = {}
            ref = -s_ref.sum() / rm.sum()
            loss = (1 - s["gamma"]) * npo + s["gamma"] * kl_imm + s["rho"] * ref
            extra = {}
            if s["retain"] > 0 or (s["contrast"] > 0 and s["contrast_loss"] == "dpo"):
                cids, catt, ctgt, cm = C
                lg_c = logits_of(student, cids, catt)
            if s["retain"] > 0:
                # retain: KL(pi_B || pi) on the harmless answers y_c, unperturbed
                retain = (kl_forward(tb_logits, lg_c) * cm).sum() / cm.sum()
                loss = loss + s["retain"] * retain
                extra["retain"] = float(retain)
            if s["contrast"] > 0 and s["contrast_loss"] == "rank":
                # the rank contrast: the same refusal likelier after the harmful prompt than
                # after the paired harmless one
                aids, aatt, atgt, am = paired_refusals(by_harmless=False)
                s_after = seq_logprob(logits_of(student, aids, aatt), atgt, am)
                contrast = -F.logsigmoid(s["dpo_beta"] * (s_ref - s_after)).mean()
                loss = loss + s["contrast"] * contrast
                extra["contrast"] = float(contrast)
            if s["contrast"] > 0 and s["contrast_loss"] == "dpo":
                # contrast: DPO of y_c over the refusal this step teaches, after the harmless
                # prompt (reference pi_B), so the same refusal is raised after the harmful
                # prompt and lowered after the harmless one in one update
                jids, jatt, jtgt, jm = paired_refusals(by_harmless=True)
                s_c = seq_logprob(lg_c, ctgt, cm)
                s_r = seq_logprob(logits_of(student, jids, jatt), jtgt, jm)
                with torch.no_grad():
                    sb_r = seq_logprob(logits_of(benign_teacher, jids, jatt), jtgt, jm)
                if s["dpo_length_normalized"]:
                    margin = (s_c - sb_C) / cm.sum(-1) - (s_r - sb_r) / jm.sum(-1)
                else:
                    margin = (s_c - sb_C) - (s_r - sb_r)
                contrast = -F.logsigmoid(s["dpo_beta"] * margin).mean()
                loss = loss + s["contrast"] * contrast
                extra["contrast"] = float(contrast)
            finish(loss, dict(phase="harmful", cycle=cycle, forget=float(npo), **extra,
                              kl_imm=float(kl_imm), kl_cap_rate=cap_rate, refusal=float(ref),
                              harmful_logp=float(s_h.sum() / m.sum()),
                              lat_loss_start=lat_losses[0], lat_loss_end=lat_losses[-1],
                              lat_residual_norm=resid_norm), k)
            hk += 1
        post = activations_mean(student, sites, [e["prompt"] for e in harmful])
        keys = sorted(pre, key=order_key)
        drift = {k: (post[k] - pre[k]).abs() for k in keys}
        if s["canary_drift"] == "normalized":
            # each site's drift over the root mean square of its A_pre
            drift = {k: (d.double() / pre[k].double().pow(2).mean().sqrt()).float()
                     for k, d in drift.items()}
        all_d = torch.cat([drift[k] for k in keys]).double()
        threshold = float(torch.quantile(all_d, s["q"]))
        canary_idx = {k: torch.nonzero(drift[k].double() > threshold).flatten() for k in keys}
        canary_idx = {k: v for k, v in canary_idx.items() if len(v) > 0}
        tgt_acts = activations_mean(student, sites, [e["y_c"] for e in harmless])
        if s["canary_target"] == "pre":
            tgt_acts = harmless_pre
        target = torch.cat([tgt_acts[k][canary_idx[k]] for k in sorted(canary_idx, key=order_key)])
        canaries.append(dict(cycle=cycle, count=int(sum(len(v) for v in canary_idx.values())),
                             threshold=threshold))
        for k in range(s["harmless_steps"]):
            ids, att, tgt, m = C
            sites.capture = True
            lg = logits_of(student, ids, att)
            sites.capture = False
            s_c = seq_logprob(lg, tgt, m)
            rids, ratt, rtgt, rm = Rj
            s_r = seq_logprob(logits_of(student, rids, ratt), rtgt, rm)
            margin = dpo_margin(s_c, s_r, m, rm)
            dpo = -F.logsigmoid(s["dpo_beta"] * margin).mean()
            kl_align = (kl_forward(tb_logits, lg) * m).sum() / m.sum()
            w = att.unsqueeze(-1).float()
            n = att.sum().float()
            current = torch.cat([
                (sites.captured[k] * w).sum((0, 1))[canary_idx[k]] / n
                for k in sorted(canary_idx, key=order_key)
            ])
            stab = ((current - target) ** 2).mean()
            loss = (1 - s["alpha"]) * dpo + s["alpha"] * kl_align + s["lambda_stab"] * stab
            finish(loss, dict(phase="harmless", cycle=cycle, pref=float(dpo),
                              kl_align=float(kl_align), stab=float(stab),
                              chosen_logp=float(s_c.sum() / m.sum()),
                              dpo_margin=float(margin.mean())), k)

    out = dict(
        generator="tests/reference/method.py",
        torch=torch.__version__,
        settings=s,
        harmful=harmful,
        harmless=harmless,
        steps=steps,
        canaries=canaries,
    )
    path = Path(__file__).parent / "fixtures" / name
    path.write_text(json.dumps(out, indent=1) + "\n")
    for r in steps:
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
    print(canaries)


if __name__ == "__main__":
    main()
