"""Reference fixture for the tiny deterministic Llama ("tiny" model).

What it produces
----------------
``tests/reference/fixtures/tiny.json`` -- expected values for a small random
Llama with the real SmolLM2 architecture (vocab 49152, tied embeddings, GQA)
whose weights come from a counter-based generator the Rust side reimplements
bit-for-bit (see ``weight_values`` below). The JSON holds:

* ``config``            the HF LlamaConfig fields used, plus ``seed``.
* ``generator``         a prose description of the weight generator.
* ``probes``            first 4 values (float + IEEE-754 bits) of
                        ``model.embed_tokens.weight`` and
                        ``model.layers.0.self_attn.q_proj.weight``, plus the
                        FNV-1a base and the first 4 raw splitmix64 outputs, so
                        the generator can be checked before anything else.
* ``batch``             a left-padded batch of 2 rows (7 and 10 real tokens,
                        padded to 10 with id 2, mask 0 on pads, explicit
                        position_ids = clamp(cumsum(mask) - 1, min=0)) and, for
                        every real position, logits[:256], logsumexp and argmax
                        over the full vocabulary; plus layer-1 intermediate
                        sites for batch row 1 (unpadded).
* ``grad``              loss and d loss / d delta for a zero perturbation
                        ``delta`` [2,10,64] added to the output of decoder
                        layer 2 (see ``LOSS_CONVENTION``).

How to run (from the repository root, venv from requirements.txt)
----------------------------------------------------------------
    HF_HUB_OFFLINE=1 python tests/reference/tiny.py \
        --out tests/reference/fixtures/tiny.json [--seed 0] [--save-dir DIR]

``--save-dir DIR`` additionally writes the tiny model as an HF directory
(config.json + model.safetensors) for manual checks; it is not committed.

Tolerances the Rust tests are expected to use
---------------------------------------------
* probes / generated weights: bit-exact (compare ``bits``).
* logits[:256], logsumexp:    abs <= 1e-4 (fp32 on CPU; values are O(1)).
* argmax:                     exact (the fixture records the top-2 margin,
                              ``argmax_margin``; if it is < 1e-4 a mismatch is
                              tolerable).
* layer-1 sites (resid_1, attn_out_1, mlp_hidden_1; values O(1)): abs <= 1e-5.
* Left padding is exact here: row 0's real positions equal an unpadded
  forward of the 7 tokens bit-for-bit in transformers, so the Rust side should
  not need a looser tolerance for the padded row.
* loss (~10.5): abs <= 1e-5.
* delta.grad (max |g| ~4e-2): abs <= 1e-6, i.e. relative ~2.5e-5 of the max;
  loosen to 1e-5 only if a different reduction order demonstrably needs it.
  Exact zeros are expected on pad positions of row 0 and on position 9 of both
  rows (the last position predicts nothing counted): 5 x 64 zeros in total.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1

CONFIG = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)

GENERATOR_DOC = (
    "For each tensor (HF name, HF shape, row-major): base = fnv1a64(utf8(name)) XOR seed "
    "(FNV-1a 64: offset 0xcbf29ce484222325, prime 0x100000001b3, wrapping u64). For flat index i: "
    "z = splitmix64(base + i) (wrapping), splitmix64(x): z = x + 0x9E3779B97F4A7C15; "
    "z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB; "
    "return z ^ (z >> 31). u = (z >> 40) / 2^24; s = 2u - 1 (float64). "
    "2-D weights: w = f32(s / sqrt(shape[1])) (division and sqrt in float64, shape[1] = in-dim, "
    "hidden for the embedding). 1-D norm weights: w = f32(1 + 0.1 * s) (float64 then cast). "
    "No lm_head tensor (tied to model.embed_tokens.weight)."
)

LOSS_CONVENTION = (
    "Next-token cross-entropy with natural log. For row b and position t in 1..T-1 the target is "
    "input_ids[b][t], predicted from logits[b][t-1] (log_softmax over the full vocab). A target "
    "counts iff response_mask[b][t] == 1 (response_mask[b][0] is always 0). loss = sum of counted "
    "per-target CE / number of counted targets (a single mean over all counted targets of the whole "
    "batch, not a mean of per-row means). The forward pass is the batch forward (left padding, "
    "attention_mask, explicit position_ids) with delta [2,10,64] (zeros) added to the output hidden "
    "state of decoder layer index 2 (0-based; i.e. the input of layer 3); grad is dloss/ddelta."
)

# Fixed token ids (real tokens only). Row 0 is left-padded to length 10 with PAD_ID.
ROW0 = [1, 504, 3458, 28, 12345, 40000, 9]
ROW1 = [1, 0, 256, 1023, 4096, 8191, 16384, 32767, 49151, 777]
SEQ_LEN = 10
PAD_ID = 2
RESPONSE_LEN = 4  # last 4 real tokens of each row are counted targets
LOGITS_HEAD = 256


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & MASK64
    return h


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def raw_z(name: str, seed: int, n: int) -> np.ndarray:
    base = np.uint64(fnv1a64(name.encode("utf-8")) ^ (seed & MASK64))
    with np.errstate(over="ignore"):
        idx = base + np.arange(n, dtype=np.uint64)  # wrapping add
    return splitmix64(idx)


def weight_values(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    n = int(np.prod(shape))
    z = raw_z(name, seed, n)
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    s = 2.0 * u - 1.0
    if len(shape) == 2:
        w = s / math.sqrt(shape[1])
    elif len(shape) == 1:
        w = 1.0 + 0.1 * s
    else:
        raise ValueError(f"unexpected rank for {name}: {shape}")
    return w.astype(np.float32).reshape(shape)


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q_out = cfg["num_attention_heads"] * hd
    kv_out = cfg["num_key_value_heads"] * hd
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q_out, h)),
            (p + "self_attn.k_proj.weight", (kv_out, h)),
            (p + "self_attn.v_proj.weight", (kv_out, h)),
            (p + "self_attn.o_proj.weight", (h, q_out)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", True):
        specs.append(("lm_head.weight", (v, h)))
    return specs


def f32_list(a) -> list:
    """Nested lists of floats written with the shortest repr that round-trips as f32."""
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim == 0:
        return f32_scalar(arr)
    flat = [float(np.format_float_scientific(x, unique=True, trim="-")) for x in arr.reshape(-1)]
    out = np.empty(arr.shape, dtype=object).reshape(-1)
    out[:] = flat
    return out.reshape(arr.shape).tolist()


def f32_scalar(x) -> float:
    return float(np.format_float_scientific(np.float32(x), unique=True, trim="-"))


def build_model(seed: int) -> tuple[LlamaForCausalLM, dict]:
    cfg = LlamaConfig(**CONFIG, attn_implementation="eager", dtype=torch.float32)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).to(torch.float32)
    state = {name: torch.from_numpy(weight_values(name, shape, seed)) for name, shape in tensor_specs(CONFIG)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The only key we do not provide is the tied lm_head.weight.
    assert unexpected == [], unexpected
    assert missing == ["lm_head.weight"], missing
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    # Strict check: every parameter equals the generated tensor.
    sd = model.state_dict()
    for name, t in state.items():
        assert torch.equal(sd[name], t), name
    assert torch.equal(sd["lm_head.weight"], state["model.embed_tokens.weight"])
    model.eval()
    return model, state


def make_batch():
    rows = [ROW0, ROW1]
    ids, mask = [], []
    for r in rows:
        pad = SEQ_LEN - len(r)
        ids.append([PAD_ID] * pad + r)
        mask.append([0] * pad + [1] * len(r))
    input_ids = torch.tensor(ids, dtype=torch.long)
    attention_mask = torch.tensor(mask, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    response = torch.zeros_like(attention_mask)
    for b, r in enumerate(rows):
        response[b, SEQ_LEN - RESPONSE_LEN :] = 1
    return input_ids, attention_mask, position_ids, response


def layer_output_tensor(out):
    """transformers 4.57 LlamaDecoderLayer returns a bare tensor; older versions a tuple."""
    return out[0] if isinstance(out, tuple) else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "fixtures" / "tiny.json"))
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, state = build_model(args.seed)

    # ---- probes ----
    probes = {}
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]:
        vals = state[name].reshape(-1)[:4].numpy()
        base = fnv1a64(name.encode()) ^ args.seed
        probes[name] = {
            "fnv1a64_xor_seed": f"0x{base:016x}",
            "splitmix64_first4": [f"0x{int(z):016x}" for z in raw_z(name, args.seed, 4)],
            "values": f32_list(vals),
            "bits": [int(b) for b in vals.view(np.uint32)],
        }

    input_ids, attention_mask, position_ids, response = make_batch()

    # ---- the untied variant: its own lm_head.weight from the same generator ----
    untied_cfg = {**CONFIG, "tie_word_embeddings": False}
    ucfg = LlamaConfig(**untied_cfg, attn_implementation="eager", dtype=torch.float32)
    ucfg._attn_implementation = "eager"
    untied = LlamaForCausalLM(ucfg).to(torch.float32)
    ustate = {n: torch.from_numpy(weight_values(n, sh, args.seed)) for n, sh in tensor_specs(untied_cfg)}
    res = untied.load_state_dict(ustate, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    untied.eval()
    untied_ids = torch.tensor([[1, 504, 3458, 28, 12345, 9]])
    with torch.no_grad():
        ulogits = untied(input_ids=untied_ids, use_cache=False).logits.float()[0]
    untied_fixture = {
        "input_ids": untied_ids[0].tolist(),
        "logits_head_len": LOGITS_HEAD,
        "logits_head": f32_list(ulogits[:, :LOGITS_HEAD]),
        "logsumexp": f32_list(torch.logsumexp(ulogits.double(), dim=-1)),
        "argmax": ulogits.argmax(dim=-1).tolist(),
    }

    # ---- batch forward with layer-1 site capture ----
    sites = {}
    layer1 = model.model.layers[1]
    hooks = [
        layer1.register_forward_hook(lambda m, i, o: sites.update(resid_1=layer_output_tensor(o).detach(), _type=type(o).__name__)),
        layer1.self_attn.register_forward_hook(lambda m, i, o: sites.__setitem__("attn_out_1", o[0].detach())),
        layer1.mlp.down_proj.register_forward_pre_hook(lambda m, i: sites.__setitem__("mlp_hidden_1", i[0].detach())),
    ]
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    for h in hooks:
        h.remove()
    layer_out_type = sites.pop("_type")
    logits = out.logits.float()
    assert torch.isfinite(logits).all()
    lse = torch.logsumexp(logits.double(), dim=-1)
    top2 = logits.topk(2, dim=-1)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(argmax, top2.indices[..., 0])
    positions = []
    for b in range(2):
        for t in range(SEQ_LEN):
            if attention_mask[b, t] == 0:
                continue
            positions.append({
                "row": b,
                "pos": t,
                "logits_head": f32_list(logits[b, t, :LOGITS_HEAD]),
                "logsumexp": f32_scalar(lse[b, t].item()),
                "argmax": int(argmax[b, t]),
                "argmax_margin": f32_scalar((top2.values[b, t, 0] - top2.values[b, t, 1]).item()),
            })
    layer1_sites = {k: f32_list(v[1]) for k, v in sites.items()}

    # ---- gradient check ----
    delta = torch.zeros(2, SEQ_LEN, CONFIG["hidden_size"], dtype=torch.float32, requires_grad=True)

    def add_delta(m, i, o):
        if isinstance(o, tuple):
            return (o[0] + delta,) + tuple(o[1:])
        return o + delta

    hook = model.model.layers[2].register_forward_hook(add_delta)
    out2 = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hook.remove()
    assert torch.equal(out2.logits.detach(), out.logits), "zero delta changed the logits"
    logp = torch.log_softmax(out2.logits[:, :-1, :], dim=-1)
    targets = input_ids[:, 1:]
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    counted = response[:, 1:].to(torch.float32)
    loss = (nll * counted).sum() / counted.sum()
    loss.backward()
    grad = delta.grad.detach()
    assert torch.isfinite(grad).all()
    pad_grad = grad[attention_mask == 0].abs().max().item()

    fixture = {
        "description": "Tiny deterministic Llama reference (tests/reference/tiny.py)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": {**CONFIG, "seed": args.seed, "attn_implementation": "eager", "dtype": "float32"},
        "generator": GENERATOR_DOC,
        "probes": probes,
        "batch": {
            "input_ids": input_ids.tolist(),
            "attention_mask": attention_mask.tolist(),
            "position_ids": position_ids.tolist(),
            "logits_head_len": LOGITS_HEAD,
            "positions": positions,
            "layer1_sites_row": 1,
            "layer1_sites": layer1_sites,
            "layer1_sites_doc": (
                "Batch row 1 (unpadded, 10 tokens), from the batch forward. resid_1: output hidden "
                "state of decoder layer index 1 [10,64]; attn_out_1: layers[1].self_attn output after "
                "o_proj, before the residual add [10,64]; mlp_hidden_1: input of layers[1].mlp.down_proj, "
                "silu(gate) * up [10,128]."
            ),
        },
        "grad": {
            "loss_convention": LOSS_CONVENTION,
            "response_mask": response.tolist(),
            "num_counted_targets": int(counted.sum().item()),
            "delta_layer": 2,
            "loss": f32_scalar(loss.item()),
            "delta_grad": f32_list(grad),
            "max_abs_grad_on_pad_positions": pad_grad,
        },
        "untied": untied_fixture,
        "notes": {"decoder_layer_output_type": layer_out_type},
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes)")
    print("probes:", json.dumps(probes, indent=1))
    print(f"loss={loss.item():.6f} grad max={grad.abs().max().item():.3e} pad grad max={pad_grad:.3e}")
    print(f"decoder layer returns: {layer_out_type}")

    if args.save_dir:
        model.save_pretrained(args.save_dir, safe_serialization=True)
        print(f"saved HF directory to {args.save_dir}")


if __name__ == "__main__":
    main()
