#!/usr/bin/env bash
# The prepared GPU check: run on a CUDA machine that has no Rust toolchain, from the repository
# root, after `cargo xtask gpu-check --build` built the CUDA binaries on a CPU machine (carry
# `.device/gpu-check` with the working tree). Within 10 minutes of GPU time, warm-up included:
#
#   1. the backend-generic tests on Autodiff<Cuda>: the tiny model's parity with transformers
#      (logits, sites, dCE/ddelta), the fused losses, LAT, the canaries and the method's
#      trajectory, against the same fixtures and tolerances as on the CPU;
#   2. the method's harmful and harmless steps (`antibody-train bench`, random weights of
#      SmolLM2-135M's architecture) at fp32 and bf16 (`--dtype bf16`: mixed precision, f32
#      master weights) × batch 8/32 × seq 256, one untimed warm-up step each (the first use of
#      a kernel shape compiles and autotunes), beside the PyTorch peer (bench/method_peer.py at
#      fp32 and bf16) where python3 has torch with CUDA;
#   3. one table of everything, also written to $OUT/gpu_check.md when $OUT is set.
#
# The peer's bf16 rows on the H200, measured earlier: 44.1k / 56.6k tok/s, 27 GiB at batch
# 32 × 256.
#
# Usage: bash bench/gpu_check.sh [BINARIES_DIR]     (default .device/gpu-check)
#        GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh  (no GPU: checks the layout, runs nothing)
set -uo pipefail
dir=${1:-.device/gpu-check}
dry=${GPU_CHECK_DRY_RUN:-0}
export ANTIBODY_REPO=$PWD
steps=${GPU_CHECK_STEPS:-3}
rows=()
fail=0

# The binaries travel stripped and xz-compressed: unpack them beside the checkout.
if [[ -f $dir/antibody-train.xz ]]; then
  unpacked=${TMPDIR:-/tmp}/antibody-gpu-check
  rm -rf "$unpacked" && mkdir -p "$unpacked/tests"
  cp "$dir/REVISION" "$unpacked/" 2>/dev/null
  xz -dc "$dir/antibody-train.xz" >"$unpacked/antibody-train"
  for f in "$dir"/tests/*.xz; do
    xz -dc "$f" >"$unpacked/tests/$(basename "$f" .xz)"
  done
  chmod +x "$unpacked/antibody-train" "$unpacked"/tests/*
  dir=$unpacked
fi
if [[ ! -x $dir/antibody-train || ! -d $dir/tests ]]; then
  echo "gpu_check: $dir has no antibody-train or tests/: run \`cargo xtask gpu-check --build\` on a machine with cargo and carry $dir" >&2
  exit 2
fi
if [[ ! -f tests/reference/fixtures/tiny.json ]]; then
  echo "gpu_check: run from the repository root (tests/reference/fixtures/tiny.json not found in $PWD)" >&2
  exit 2
fi
echo "binaries built at $(cat "$dir/REVISION" 2>/dev/null || echo '?'); checkout at $(git rev-parse HEAD 2>/dev/null || echo '?')"
if [[ $dry != 1 ]]; then
  if ! nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; then
    echo "gpu_check: no CUDA GPU (nvidia-smi failed); GPU_CHECK_DRY_RUN=1 checks the layout only" >&2
    exit 2
  fi
fi

run() { # name, command...
  local name=$1; shift
  if [[ $dry == 1 ]]; then
    echo "would run: $*"
    rows+=("| $name | (dry run) | |")
    return 0
  fi
  local start end out rc
  start=$(date +%s.%N)
  out=$("$@" 2>&1); rc=$?
  end=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  if [[ $rc == 0 ]]; then
    rows+=("| $name | passed | ${secs} s |")
  else
    fail=1
    rows+=("| $name | FAILED (exit $rc) | ${secs} s |")
    echo "----- $name failed:"; echo "$out" | tail -40
  fi
  LAST_OUT=$out
}

# 1. Parity on CUDA.
for t in "$dir"/tests/*; do
  run "test $(basename "$t")" timeout 240 "$t" --test-threads 1
done

# 2. The method's steps beside the peer.
peer=0
if [[ $dry != 1 ]] && python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  peer=1
fi
bench=()
for b in 8 32; do
  for phase in harmful harmless; do
    for dtype in fp32 bf16; do
      LAST_OUT=""
      run "antibody $phase $dtype ${b}×256" timeout 240 "$dir/antibody-train" bench --phase "$phase" \
        --batch "$b" --seq 256 --steps "$steps" --warmup 1 --device cuda --dtype "$dtype"
      bench+=("antibody|$phase|$dtype|$b|$(echo "$LAST_OUT" | grep '^{' | tail -1)")
    done
    if [[ $peer == 1 ]]; then
      for dtype in fp32 bf16; do
        LAST_OUT=""
        run "peer $phase $dtype ${b}×256" timeout 240 python3 bench/method_peer.py --phase "$phase" \
          --batch "$b" --seq 256 --steps "$steps" --warmup 1 --device cuda --dtype "$dtype"
        bench+=("peer|$phase|$dtype|$b|$(echo "$LAST_OUT" | grep '^{' | tail -1)")
      done
    fi
  done
done

{
  echo "## GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "| impl | phase | dtype | batch × seq | tok/s | peak GiB |"
  echo "|---|---|---|---|---|---|"
  for r in "${bench[@]}"; do
    IFS='|' read -r impl phase dtype b json <<<"$r"
    python3 - "$impl" "$phase" "$dtype" "$b" "$json" <<'EOF'
import json, sys
impl, phase, dtype, b, text = sys.argv[1:6]
try:
    j = json.loads(text)
    tps = f"{j['tokens_per_s']:.0f}"
    peak = j.get("peak_bytes")
    gib = f"{peak / 2**30:.2f}" if peak else "-"
except Exception:
    tps, gib = "-", "-"
print(f"| {impl} | {phase} | {dtype} | {b}×256 | {tps} | {gib} |")
EOF
  done
  [[ $peer == 1 ]] || echo "(no PyTorch with CUDA here: peer rows not run)"
} | tee "${OUT:-/tmp}/gpu_check.md"
exit $fail
