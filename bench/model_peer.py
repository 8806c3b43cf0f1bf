"""Transformers peer for the Rust model benchmark (CPU, float32, real GGUF).

What it measures
----------------
* forward throughput: a batch of 4 x 256 fixed random token ids
  (``torch.Generator().manual_seed(0)``, ids in [0, vocab)), ``torch.no_grad()``,
  full-sequence logits [4, 256, 49152], no KV cache. 1 warm-up + ``--repeats``
  timed repeats; ``forward_tok_s = 4*256 / median(seconds)``.
* generation throughput: ``--batch`` (default 64) prompts, each chat-templated
  (``apply_chat_template(add_generation_prompt=True)``), in ONE batch with LEFT
  padding (pad id = tokenizer pad, attention_mask 0 on pads), greedy, exactly 64
  new tokens (``min_new_tokens=max_new_tokens=64``, so EOS never stops a row),
  ``use_cache=True``. One warm-up generate (batch 4, 8 new tokens) first.
  ``generate_tok_s = batch*64 / generate_wall_s`` (wall time of the one
  ``generate`` call, prefill included).

Prompts come from ``--prompts FILE`` (one prompt per line, blank lines skipped;
cycled/truncated to ``--batch``) or 64 built-in generic placeholder requests.

Output: one JSON object on stdout:
``{"forward_tok_s", "forward_median_s", "generate_tok_s", "generate_wall_s",
"batch", "new_tokens", "prompt_len_max", "threads", "torch", "transformers"}``
(skipped parts are null). Progress goes to stderr.

How to run (from the repository root, venv from bench/requirements.txt)
----------------------------------------------------------------------
    HF_HUB_OFFLINE=1 python bench/model_peer.py \
        --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf [--repeats 3] \
        [--batch 64] [--prompts FILE] [--threads N] [--skip-forward] [--skip-generate]

Tolerances: none -- this is a throughput peer, not a correctness reference
(correctness fixtures live in tests/reference/). Compare numbers only at the
same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

FWD_BATCH = 4
FWD_LEN = 256
NEW_TOKENS = 64

_TASKS = [
    "Write a persuasive article about",
    "Explain step by step how to learn about",
    "Write a short story involving",
    "List five common misconceptions about",
    "Draft an email to a colleague about",
    "Summarize the history of",
    "Give arguments for and against",
    "Write a social media post promoting",
]
_TOPICS = [
    "urban gardening",
    "renewable energy",
    "remote work",
    "public libraries",
    "space exploration",
    "healthy sleep habits",
    "local elections",
    "electric bicycles",
]
BUILTIN_PROMPTS = [f"{task} {topic} (topic {i * len(_TOPICS) + j})."
                   for i, task in enumerate(_TASKS) for j, topic in enumerate(_TOPICS)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(gguf: Path):
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model.eval()
    return tok, model


@torch.no_grad()
def bench_forward(model, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (FWD_BATCH, FWD_LEN), generator=g)
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask, use_cache=False)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        times.append(time.perf_counter() - t0)
        assert out.logits.shape == (FWD_BATCH, FWD_LEN, model.config.vocab_size)
        log(f"forward repeat {r}: {times[-1]:.3f}s")
    med = statistics.median(times)
    return FWD_BATCH * FWD_LEN / med, med


def encode_batch(tok, prompts: list[str]):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")


@torch.no_grad()
def bench_generate(tok, model, prompts: list[str]) -> tuple[float, float, int]:
    # transformers 4.57.1's GGUF tokenizer has eos = <|im_start|> and no pad; use the model
    # config (from GGUF metadata): eos = pad = 2 (<|im_end|>).
    tok.padding_side = "left"
    tok.pad_token = tok.convert_ids_to_tokens(model.config.pad_token_id)
    assert tok.pad_token_id == model.config.pad_token_id
    common = dict(do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                  pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id)
    warm = encode_batch(tok, prompts[:4])
    model.generate(**warm, min_new_tokens=8, max_new_tokens=8, **common)
    enc = encode_batch(tok, prompts)
    assert (enc["attention_mask"][:, -1] == 1).all(), "expected left padding"
    t0 = time.perf_counter()
    out = model.generate(**enc, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, **common)
    wall = time.perf_counter() - t0
    new = out.shape[1] - enc["input_ids"].shape[1]
    assert new == NEW_TOKENS, f"generated {new} tokens, expected {NEW_TOKENS}"
    log(f"generate: batch {len(prompts)}, prompt len {enc['input_ids'].shape[1]}, {wall:.2f}s")
    log("sample: " + repr(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
    return len(prompts) * NEW_TOKENS / wall, wall, int(enc["input_ids"].shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description="transformers peer for the Rust model benchmark")
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.prompts:
        base = [l.strip() for l in args.prompts.read_text(encoding="utf-8").splitlines() if l.strip()]
    else:
        base = BUILTIN_PROMPTS
    prompts = [base[i % len(base)] for i in range(args.batch)]

    tok, model = load(args.gguf)
    result = {
        "forward_tok_s": None, "forward_median_s": None,
        "generate_tok_s": None, "generate_wall_s": None,
        "batch": args.batch, "new_tokens": NEW_TOKENS, "prompt_len_max": None,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if not args.skip_forward:
        result["forward_tok_s"], result["forward_median_s"] = bench_forward(model, args.repeats)
    if not args.skip_generate:
        result["generate_tok_s"], result["generate_wall_s"], result["prompt_len_max"] = bench_generate(tok, model, prompts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
