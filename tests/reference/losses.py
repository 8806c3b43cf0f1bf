"""Reference values and gradients for antibody-losses, computed with PyTorch autograd.

What it produces
----------------
``tests/reference/fixtures/losses.json``: random inputs (seeded) and, for every loss of
``crates/antibody-losses``, the value and the gradient with respect to the student logits.
Shapes: batch 3, 6 positions, vocabulary 37 (odd, so a chunk of 8 leaves a remainder).
Row 2 is right-padded (its last 3 positions have mask 0); one student position holds
extreme logits (+60/-60) to exercise numerical stability.

Conventions (the Rust side follows them):
* ``mask[b, t]`` = 1 where position t's next-token prediction counts.
* ``s(y|x) = sum_t mask * log_softmax(logits)[target]``.
* NPO: ``-logsigmoid(beta * (s_ref - s_pol)).mean()`` (times 2/beta when scaled).
* DPO: ``-logsigmoid(beta * ((s_pc - s_rc) - (s_pr - s_rr))).mean()``.
* KL per position: forward ``sum p_T (log p_T - log p_S)``, reverse ``sum p_S (log p_S - log p_T)``;
  the KL loss is the masked mean over positions.
* Immunization: ``-(min(KL_fwd, cap) * mask).sum() / mask.sum()``; cap rate = share of counted
  positions with ``KL > cap``.
* SFT: masked mean of ``-log p(target)``; entropy loss: ``-(masked mean entropy)``.

How to run (from the repository root, venv from requirements.txt)
----------------------------------------------------------------
    python tests/reference/losses.py --out tests/reference/fixtures/losses.json
"""

import argparse
import json

import torch
import torch.nn.functional as F

B, T, V = 3, 6, 37
BETA = 0.5


def seq_logprob(logits, targets, mask):
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def kl_pos(teacher, student, direction):
    lt = F.log_softmax(teacher, -1)
    ls = F.log_softmax(student, -1)
    if direction == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    return (ls.exp() * (ls - lt)).sum(-1)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def value_and_grad(fn, *leaves):
    leaves = [l.detach().clone().requires_grad_(True) for l in leaves]
    out = fn(*leaves)
    out.backward()
    return float(out.item()), [flat(l.grad) for l in leaves]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    student = torch.randn(B, T, V) * 3.0
    student[0, 1, 5] = 60.0
    student[0, 1, 6] = -60.0
    teacher = torch.randn(B, T, V) * 3.0
    chosen = torch.randn(B, T, V) * 2.0
    rejected = torch.randn(B, T, V) * 2.0
    ref_chosen = torch.randn(B, T, V) * 2.0
    ref_rejected = torch.randn(B, T, V) * 2.0
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[:, 0] = 0.0  # a prompt position
    mask[:, -1] = 0.0  # the last position predicts nothing
    mask[2, 3:] = 0.0  # padding

    out = {
        "shape": [B, T, V],
        "beta": BETA,
        "inputs": {
            "student": flat(student),
            "teacher": flat(teacher),
            "chosen": flat(chosen),
            "rejected": flat(rejected),
            "ref_chosen": flat(ref_chosen),
            "ref_rejected": flat(ref_rejected),
            "targets": [int(v) for v in targets.reshape(-1).tolist()],
            "mask": flat(mask),
        },
    }
    with torch.no_grad():
        out["token_logprobs"] = flat(
            F.log_softmax(student, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        )
        out["sequence_logprob"] = flat(seq_logprob(student, targets, mask))
        out["entropy"] = flat(-(F.log_softmax(student, -1).exp() * F.log_softmax(student, -1)).sum(-1))

    s_teacher = seq_logprob(teacher, targets, mask).detach()

    def npo(scaled):
        def f(s):
            loss = -F.logsigmoid(BETA * (s_teacher - seq_logprob(s, targets, mask))).mean()
            return loss * (2.0 / BETA) if scaled else loss
        return f

    for name, scaled in [("npo", False), ("npo_scaled", True)]:
        v, (g,) = value_and_grad(npo(scaled), student)
        out[name] = {"value": v, "grad": g}

    s_rc = seq_logprob(ref_chosen, targets, mask).detach()
    s_rr = seq_logprob(ref_rejected, targets, mask).detach()

    def dpo(c, r):
        margin = (seq_logprob(c, targets, mask) - s_rc) - (seq_logprob(r, targets, mask) - s_rr)
        return -F.logsigmoid(BETA * margin).mean()

    v, (gc, gr) = value_and_grad(dpo, chosen, rejected)
    out["dpo"] = {"value": v, "grad_chosen": gc, "grad_rejected": gr}

    for direction in ["forward", "reverse"]:
        with torch.no_grad():
            per = kl_pos(teacher, student, direction)
        v, (g,) = value_and_grad(lambda s: masked_mean(kl_pos(teacher, s, direction), mask), student)
        out[f"kl_{direction}"] = {"per_position": flat(per), "value": v, "grad": g}

    with torch.no_grad():
        per = kl_pos(teacher, student, "forward")
    counted = per[mask > 0]
    # Halfway between the two middle KL values: no position sits on the cap itself.
    ordered = counted.sort().values
    k = len(ordered) // 2
    cap = float((ordered[k - 1] + ordered[k]).item() / 2.0)
    cap_rate = float((counted > cap).float().mean().item())
    v, (g,) = value_and_grad(
        lambda s: -masked_mean(kl_pos(teacher, s, "forward").clamp(max=cap), mask), student
    )
    out["immunization"] = {"cap": cap, "cap_rate": cap_rate, "value": v, "grad": g}

    def sft(s):
        logp = F.log_softmax(s, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return masked_mean(-logp, mask)

    v, (g,) = value_and_grad(sft, student)
    out["sft"] = {"value": v, "grad": g}

    def ent(s):
        lp = F.log_softmax(s, -1)
        return -masked_mean(-(lp.exp() * lp).sum(-1), mask)

    v, (g,) = value_and_grad(ent, student)
    out["entropy_loss"] = {"value": v, "grad": g}

    # The same KL terms computed from hidden states and head weights (logits = h @ W.T), with
    # gradients with respect to the student's hidden states and head.
    D = 5
    heads = {
        "teacher_h": torch.randn(B, T, D),
        "teacher_w": torch.randn(V, D),
        "student_h": torch.randn(B, T, D),
        "student_w": torch.randn(V, D),
    }
    head = {"hidden": D, "inputs": {k: flat(v) for k, v in heads.items()}}
    t_logits = heads["teacher_h"] @ heads["teacher_w"].T

    def head_case(direction, cap=None):
        sh = heads["student_h"].clone().requires_grad_(True)
        sw = heads["student_w"].clone().requires_grad_(True)
        per = kl_pos(t_logits, sh @ sw.T, direction)
        case = {"per_position": flat(per)}
        if cap is None:
            loss = masked_mean(per, mask)
        else:
            loss = -masked_mean(per.clamp(max=cap), mask)
            counted = per.detach()[mask > 0]
            case["cap"] = cap
            case["cap_rate"] = float((counted > cap).float().mean().item())
        loss.backward()
        case.update({"value": float(loss.item()), "grad_h": flat(sh.grad), "grad_w": flat(sw.grad)})
        return case

    head["kl_forward"] = head_case("forward")
    head["kl_reverse"] = head_case("reverse")
    with torch.no_grad():
        per = kl_pos(t_logits, heads["student_h"] @ heads["student_w"].T, "forward")[mask > 0]
    ordered = per.sort().values
    k = len(ordered) // 2
    head["immunization"] = head_case("forward", float((ordered[k - 1] + ordered[k]).item() / 2.0))
    out["head"] = head

    out["versions"] = {"torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump(out, f)
        f.write("\n")
    print(f"wrote {args.out}: npo={out['npo']['value']:.6f} dpo={out['dpo']['value']:.6f} "
          f"imm={out['immunization']['value']:.6f} cap_rate={cap_rate:.3f}")


if __name__ == "__main__":
    main()
