"""Reference fixtures for the real checkpoint (SmolLM2-135M-Instruct, GGUF).

What it produces
----------------
* ``tests/reference/fixtures/smollm2.json`` -- chat-template ids and rendered
  strings, the raw chat template, tokenizer ids and decode round-trips, the
  per-position logsumexp/argmax of one prompt, greedy continuations, metadata
  (versions, GGUF sha256, generation config).
* ``tests/reference/fixtures/smollm2_logits.safetensors`` -- float32/int64
  tensors: ``last_logits_0`` / ``last_logits_1`` [49152] (last-position logits
  of chat prompts 0 and 1), ``seq_logits_head_0`` [T,512] (logits[:, :512] of
  chat prompt 0 at every position), ``seq_lse_0`` [T] (float32 logsumexp over
  the full vocab, computed in float64), ``seq_argmax_0`` [T] (int64).

The model is loaded with transformers' GGUF loader
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name,
dtype=torch.float32)``), which dequantizes Q4_1 to float32 and
reverse-permutes q/k from the GGUF (llama.cpp interleaved) layout back to the
HF rotate-half layout. Attention is eager, everything float32 on CPU.
transformers 4.57.1's GGUF tokenizer conversion gets the special tokens wrong
(bos = eos = ``<|im_start|>``, no pad, add_bos_token=True); the script patches
them to the GGUF metadata (bos 1 ``<|im_start|>``, eos 2 ``<|im_end|>``, pad 2,
add_bos_token False) before producing anything, and records the raw values
under ``meta.transformers_gguf_tokenizer_quirks``.

How to run (from the repository root, venv from requirements.txt)
----------------------------------------------------------------
    HF_HUB_OFFLINE=1 python tests/reference/model.py \
        --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out tests/reference/fixtures/smollm2.json

Checking a directory exported by the Rust side (config.json,
model.safetensors, tokenizer.json) against the GGUF-loaded model:

    HF_HUB_OFFLINE=1 python tests/reference/model.py \
        --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf --check-saved DIR

prints the max abs diff of last-position logits per chat prompt and the
tokenizer comparison, and exits 1 if any logits diff exceeds 1e-4 or any
token id differs.

Tolerances the Rust tests are expected to use
---------------------------------------------
* chat-template ids, tokenizer ids, decoded strings: exact.
* ``last_logits_*`` / ``seq_logits_head_0``: abs <= 2e-3 (30 fp32 layers on
  dequantized weights, logits magnitude ~10-30; different matmul summation
  orders give ~1e-4..1e-3); ``seq_lse_0``: abs <= 2e-3.
* ``seq_argmax_0``: exact wherever the top-2 margin (``seq_argmax_margin_0`` in
  the JSON) is > 1e-2.
* greedy continuations: exact token ids expected; if they diverge, the
  divergence must happen at a step whose top-2 margin is tiny (the JSON records
  ``top2_margins`` per generated step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "Hi! Can you help me with some math?"},
        {"role": "assistant", "content": "Of course! What would you like to know?"},
        {"role": "user", "content": "What is 12 times 7?"},
    ],
    [{"role": "user", "content": "Translate \u00abcaf\u00e9 au lait\u00bb into English, then count 1, 2, 3 \u2026 \u00bfQu\u00e9 tal? \U0001F600 \u65e5\u672c\u8a9e 2024-06-01."}],
]

TOKENIZER_TEXTS = [
    "hi 123",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\n\nline four\n",
    "tab\tseparated\tvalues\t",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u201cquotes\u201d \U0001F600\U0001F680 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4",
    "def square(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nhello<|im_end|>\n",
    "12345678901234567890 3.14159 -42 1,000,000",
    "don't you're I'll WE'VE",
    "Hello , world . It 's fine ?",
    " ",
    "",
]

LAST_LOGITS_PROMPTS = [0, 1]
SEQ_PROMPT = 0
SEQ_HEAD = 512
MAX_NEW_TOKENS = 32
CHECK_TOL = 1e-4


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_tokenizer_metadata(gguf: Path) -> dict:
    """Tokenizer-related GGUF metadata, read directly with the gguf package."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))
    out = {}
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"]:
        f = r.fields.get(key)
        out[key] = f.contents() if f is not None else None
    return out


def load_gguf(gguf: Path):
    """Load tokenizer + model from the GGUF, then fix the tokenizer's special tokens.

    transformers 4.57.1's GGUFLlamaConverter (integrations/ggml.py) sets BOTH bos_token and
    eos_token to tokens[bos_token_id] (``<|im_start|>``), leaves pad unset and uses
    LlamaTokenizerFast's default add_bos_token=True, although the GGUF says eos=2
    (``<|im_end|>``), pad=2, add_bos_token=False. The BPE itself is unaffected. We record the
    raw values and then patch the tokenizer to the GGUF metadata.
    """
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    md = gguf_tokenizer_metadata(gguf)
    raw = {
        "bos": [tok.bos_token, tok.bos_token_id],
        "eos": [tok.eos_token, tok.eos_token_id],
        "pad": [tok.pad_token, tok.pad_token_id],
        "add_bos_token": getattr(tok, "add_bos_token", None),
        "encode_hi_default_special": tok.encode("hi"),
    }
    bos, eos, pad = (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"],
                     md["tokenizer.ggml.padding_token_id"])
    tok.bos_token = tok.convert_ids_to_tokens(bos)
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    tok.pad_token = tok.convert_ids_to_tokens(pad)
    tok.add_bos_token = bool(md["tokenizer.ggml.add_bos_token"])  # updates the post-processor
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, pad)
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    assert model.config.eos_token_id == eos and model.config.pad_token_id == pad
    tok.raw_transformers_special = raw
    tok.gguf_metadata = md
    return tok, model


def chat_ids(tok, msgs) -> list[int]:
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


@torch.no_grad()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0, -1].float()


def f32(x) -> float:
    return float(np.format_float_scientific(np.float32(x), unique=True, trim="-"))


def check_saved(args, tok, model) -> int:
    from transformers import PreTrainedTokenizerFast

    d = Path(args.check_saved)
    ok = True
    saved = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
    saved.eval()
    print(f"saved config: {saved.config.model_type}, layers={saved.config.num_hidden_layers}, "
          f"tie={saved.config.tie_word_embeddings}")
    for i, msgs in enumerate(CHAT_PROMPTS):
        ids = chat_ids(tok, msgs)
        a = last_logits(model, ids)
        b = last_logits(saved, ids)
        diff = (a - b).abs().max().item()
        flag = "OK" if diff <= CHECK_TOL else "FAIL"
        print(f"chat prompt {i}: T={len(ids)} last-logits max abs diff = {diff:.3e} [{flag}] "
              f"argmax gguf={int(a.argmax())} saved={int(b.argmax())}")
        ok &= diff <= CHECK_TOL

    tj = d / "tokenizer.json"
    if not tj.exists():
        print(f"FAIL: {tj} missing")
        return 1
    stok = PreTrainedTokenizerFast(tokenizer_file=str(tj))
    texts = list(TOKENIZER_TEXTS) + [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                                     for m in CHAT_PROMPTS]
    n_bad = 0
    for t in texts:
        a = tok.encode(t, add_special_tokens=False)
        b = stok.encode(t, add_special_tokens=False)
        if a != b:
            n_bad += 1
            print(f"tokenizer mismatch on {t!r}:\n  gguf : {a}\n  saved: {b}")
        elif stok.decode(b, clean_up_tokenization_spaces=False) != tok.decode(a, clean_up_tokenization_spaces=False):
            n_bad += 1
            print(f"decode mismatch on {t!r}: {stok.decode(b, clean_up_tokenization_spaces=False)!r}")
        if stok.encode(t) != a:
            # GGUF metadata says add_bos_token=False; a post-processor adding BOS would show here.
            print(f"warning: saved tokenizer.json default encode (post-processor) adds tokens on {t!r}: "
                  f"{stok.encode(t)[:4]}...")
    print(f"tokenizer: {len(texts) - n_bad}/{len(texts)} texts identical (raw tokenizer.json, add_special_tokens=False)")
    ok &= n_bad == 0
    # If the directory is a full HF tokenizer directory, also compare the chat template.
    if (d / "tokenizer_config.json").exists():
        try:
            atok = AutoTokenizer.from_pretrained(str(d))
            if atok.chat_template:
                for i, m in enumerate(CHAT_PROMPTS):
                    if chat_ids(atok, m) != chat_ids(tok, m):
                        print(f"chat-template ids mismatch on prompt {i}")
                        ok = False
                print("chat template ids compared")
        except Exception as e:  # noqa: BLE001
            print(f"note: AutoTokenizer on saved dir failed: {e}")
    ok &= everyday_calls(d)
    print("RESULT:", "OK" if ok else "FAIL")
    return 0 if ok else 1


def everyday_calls(d: Path) -> bool:
    """The calls a user makes on an exported directory, exactly as written in transformers'
    documentation: the tokenizer's output passed whole to `generate`, and the text-generation
    pipeline. Either raising is a failure."""
    from transformers import pipeline

    ok = True
    try:
        tok = AutoTokenizer.from_pretrained(str(d))
        model = AutoModelForCausalLM.from_pretrained(str(d))
        inputs = tok("The capital of France is", return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        print(f"everyday generate: {tok.decode(out[0], skip_special_tokens=True)!r} [OK]")
    except Exception as e:  # noqa: BLE001
        print(f"everyday generate FAILED: {type(e).__name__}: {e}")
        ok = False
    try:
        gen = pipeline("text-generation", model=str(d))
        text = gen([{"role": "user", "content": "What is the capital of France?"}],
                   max_new_tokens=8, do_sample=False)
        print(f"pipeline('text-generation'): {text[0]['generated_text'][-1]!r} [OK]")
    except Exception as e:  # noqa: BLE001
        print(f"pipeline('text-generation') FAILED: {type(e).__name__}: {e}")
        ok = False
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description="SmolLM2 GGUF reference fixtures")
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "fixtures" / "smollm2.json")
    ap.add_argument("--check-saved", default=None, help="HF directory written by the Rust side")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok, model = load_gguf(args.gguf)
    if args.check_saved:
        return check_saved(args, tok, model)

    # ---- chat template ----
    chats = []
    for msgs in CHAT_PROMPTS:
        ids = chat_ids(tok, msgs)
        rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert tok.encode(rendered, add_special_tokens=False) == ids, "rendered string does not re-encode to ids"
        chats.append({"messages": msgs, "rendered": rendered, "ids": ids})

    # ---- tokenizer ----
    tok_cases = []
    for t in TOKENIZER_TEXTS:
        ids = tok.encode(t, add_special_tokens=False)
        dec = tok.decode(ids, clean_up_tokenization_spaces=False)
        tok_cases.append({
            "text": t,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": dec,
            "roundtrip_exact": dec == t,
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        })

    # ---- logits ----
    tensors: dict[str, torch.Tensor] = {}
    last = {}
    for k in LAST_LOGITS_PROMPTS:
        lg = last_logits(model, chats[k]["ids"])
        assert torch.isfinite(lg).all()
        tensors[f"last_logits_{k}"] = lg.contiguous()
        top = lg.topk(5)
        last[f"last_logits_{k}"] = {
            "chat_index": k,
            "argmax": int(lg.argmax()),
            "top5_ids": top.indices.tolist(),
            "top5_logits": [f32(v) for v in top.values.tolist()],
            "logsumexp": f32(torch.logsumexp(lg.double(), -1).item()),
        }
    with torch.no_grad():
        seq = model(input_ids=torch.tensor([chats[SEQ_PROMPT]["ids"]]), use_cache=False).logits[0].float()
    assert torch.isfinite(seq).all()
    # The full-sequence forward must agree with the single-sequence last-position forward.
    assert torch.allclose(seq[-1], tensors[f"last_logits_{SEQ_PROMPT}"], atol=1e-4)
    seq_lse = torch.logsumexp(seq.double(), -1).float()
    seq_top2 = seq.topk(2, -1)
    seq_argmax = seq.argmax(-1)
    tensors["seq_logits_head_0"] = seq[:, :SEQ_HEAD].contiguous()
    tensors["seq_lse_0"] = seq_lse.contiguous()
    tensors["seq_argmax_0"] = seq_argmax.to(torch.int64).contiguous()

    # ---- greedy continuations ----
    gen_kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, temperature=None, top_p=None, top_k=None,
                      eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
                      use_cache=True, repetition_penalty=None)
    greedy = []
    for i, c in enumerate(chats):
        inp = torch.tensor([c["ids"]])
        with torch.no_grad():
            g = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), output_scores=True,
                               return_dict_in_generate=True, **gen_kwargs)
        new = g.sequences[0, inp.shape[1]:].tolist()
        margins = []
        for s in g.scores:
            t2 = s[0].float().topk(2)
            margins.append(f32((t2.values[0] - t2.values[1]).item()))
        stopped = len(new) > 0 and new[-1] == model.config.eos_token_id
        assert model.config.eos_token_id not in new[:-1]
        greedy.append({
            "chat_index": i,
            "prompt_ids": c["ids"],
            "new_ids": new,
            "num_new": len(new),
            "stopped_at_eos": bool(stopped),
            "text": tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False),
            "text_raw": tok.decode(new, clean_up_tokenization_spaces=False),
            "top2_margins": margins,
        })
        print(f"greedy {i} ({len(new)} tokens, eos={stopped}): {tok.decode(new, skip_special_tokens=True)!r}")

    gen_cfg = dict(gen_kwargs)
    gen_cfg["model_generation_config"] = model.generation_config.to_diff_dict()

    meta = {
        "gguf_file": args.gguf.name,
        "gguf_sha256": sha256_file(args.gguf),
        "gguf_size_bytes": args.gguf.stat().st_size,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "dtype": "float32",
        "attn_implementation": "eager",
        "device": "cpu",
        "generation": gen_cfg,
        "model_config": {k: v for k, v in model.config.to_diff_dict().items() if not k.startswith("_")},
        "special_tokens": {
            "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id],
            "pad": [tok.pad_token, tok.pad_token_id],
            "unk": [tok.unk_token, tok.unk_token_id],
            "add_bos_token": getattr(tok, "add_bos_token", None),
            "add_eos_token": getattr(tok, "add_eos_token", None),
            "vocab_size_tokenizer": len(tok),
            "special_token_ids": sorted(tok.all_special_ids),
            "added_tokens": {str(k): v.content for k, v in sorted(tok.added_tokens_decoder.items())},
        },
        "gguf_tokenizer_metadata": {k: v for k, v in tok.gguf_metadata.items() if k != "tokenizer.chat_template"},
        "transformers_gguf_tokenizer_quirks": {
            "raw_special_tokens_before_fix": tok.raw_transformers_special,
            "note": (
                "transformers 4.57.1 GGUFLlamaConverter sets bos AND eos to <|im_start|> (id 1), pad unset, "
                "add_bos_token=True. The script patches them to the GGUF metadata (bos 1, eos 2, pad 2, "
                "add_bos_token False) before producing anything. Its pre-tokenizer is plain ByteLevel "
                "(GPT-2 regex, add_prefix_space false) with no Digits split (SmolLM2's HF tokenizer.json "
                "has Digits(individual_digits) first; the vocab has no multi-digit tokens, so ids agree). "
                "All decoded strings use clean_up_tokenization_spaces=False (raw tokenizers decode)."
            ),
        },
        "special_tokens_doc": "after patching to the GGUF metadata",
    }

    assert tok.chat_template == tok.gguf_metadata["tokenizer.chat_template"]
    fixture = {
        "description": "SmolLM2-135M-Instruct GGUF reference (tests/reference/model.py)",
        "meta": meta,
        "chat_template": tok.chat_template,
        "chats": chats,
        "tokenizer": tok_cases,
        "last_logits": last,
        "seq_logits": {
            "chat_index": SEQ_PROMPT,
            "num_positions": int(seq.shape[0]),
            "head_len": SEQ_HEAD,
            "argmax": seq_argmax.tolist(),
            "argmax_margin": [f32(v) for v in (seq_top2.values[:, 0] - seq_top2.values[:, 1]).tolist()],
            "logsumexp": [f32(v) for v in seq_lse.tolist()],
        },
        "greedy": greedy,
        "safetensors": {
            "file": "smollm2_logits.safetensors",
            "keys": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    st_path = args.out.parent / "smollm2_logits.safetensors"
    save_file(tensors, str(st_path), metadata={"gguf_sha256": meta["gguf_sha256"], "generator": "tests/reference/model.py"})
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), {st_path} ({st_path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
