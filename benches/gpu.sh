#!/usr/bin/env bash
# One prepared run for a GPU machine: correctness, prefill and decode figures, and PyTorch's SDPA
# on the same card, all written to one results folder. Built for a machine without Rust: build
# the binaries here, carry them there.
#
#   benches/gpu.sh build                 # here: release binaries into gpu-bin/ (git-ignored)
#   benches/gpu.sh run OUT [--reduced]   # there (or here): every step, results in OUT
#
# `run` takes about 6 minutes on an H100/H200 (each step has its own time limit, so a hung step
# cannot eat the rest) and uses WGPU_BACKEND=vulkan unless it is set. `--reduced` is the same
# script at small shapes, to try the whole path on a software adapter (lavapipe) in a few
# minutes; PyTorch is skipped where it finds no CUDA device, and says so.
#
# OUT gets: info.txt (adapter, driver, commit), check.txt and check.json (`posattn check`),
# prefill.txt and prefill.json (`posattn bench`, with the matmul roof), check_coop.* and
# prefill_coop.* (the same with the cooperative-matrix score tile), decode.txt and
# decode.json (`posattn bench --decode`), tune.txt and tune.json (`posattn tune`),
# torch.txt (benches/torch_sdpa.py, prefill and decode), log.txt (every step's command, exit
# status and time).
set -uo pipefail
cd "$(dirname "$0")/.."

bins=gpu-bin

case "${1:-}" in
build)
    set -e
    cargo build --release --bin posattn
    mkdir -p "$bins"
    cp target/release/posattn "$bins/"
    git rev-parse --short HEAD >"$bins/commit" 2>/dev/null || echo unknown >"$bins/commit"
    echo "built $bins/posattn at $(cat "$bins/commit")"
    exit 0
    ;;
run)
    out="${2:?usage: benches/gpu.sh run OUT [--reduced]}"
    reduced=0
    [ "${3:-}" = "--reduced" ] && reduced=1
    ;;
*)
    echo "usage: benches/gpu.sh build | run OUT [--reduced]" >&2
    exit 2
    ;;
esac

mkdir -p "$out"
posattn="$bins/posattn"
[ -x "$posattn" ] || posattn=target/release/posattn
[ -x "$posattn" ] || { echo "no posattn binary: run 'benches/gpu.sh build' first" >&2; exit 2; }
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
log="$out/log.txt"
: >"$log"

# step NAME LIMIT_S OUTFILE CMD...: runs CMD with a time limit, stdout+stderr to OUTFILE,
# and records the command, its exit status and its time in log.txt.
step() {
    local name=$1 limit=$2 file=$3
    shift 3
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$file" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
}

if ((reduced)); then
    check_args=(--quick)
    tune_args=(--head-dim 64 --seq 256 --runs 3)
    seqs=256,512
    caches=512,1024
    batches=1
    torch_seqs=(512 1024)
    torch_caches=(512 1024)
else
    check_args=()
    tune_args=()
    seqs=512,1024,2048,4096,8192
    caches=512,1024,2048,4096,8192,16384,32768
    batches=1,4
    torch_seqs=(512 1024 2048 4096 8192)
    torch_caches=(512 1024 2048 4096 8192 16384 32768)
fi

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(cat "$bins/commit" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)"
    echo "backend: $WGPU_BACKEND"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader
} >"$out/info.txt" 2>&1
step info 60 "$out/info.txt" "$posattn" info
step check 240 "$out/check.txt" "$posattn" check --backend "$WGPU_BACKEND" "${check_args[@]}" \
    --json "$out/check.json"
step prefill 120 "$out/prefill.txt" "$posattn" bench --backend "$WGPU_BACKEND" --seq "$seqs" \
    --json "$out/prefill.json"
# The cooperative-matrix score tile (tensor cores), in steps of its own so that a failure there
# cannot cost the figures above: the quick matrix checked in that form, then the prefill table
# with the coop rows (f32 and f16 storage) beside the row form. An adapter without cooperative
# matrices reports them unsupported.
step check-coop 90 "$out/check_coop.txt" "$posattn" check --backend "$WGPU_BACKEND" --quick \
    --scores coop --json "$out/check_coop.json"
step prefill-coop 120 "$out/prefill_coop.txt" "$posattn" bench --backend "$WGPU_BACKEND" \
    --seq "$seqs" --scores coop --json "$out/prefill_coop.json"
step decode 150 "$out/decode.txt" "$posattn" bench --decode --backend "$WGPU_BACKEND" \
    --cache "$caches" --batch "$batches" --json "$out/decode.json"
# The tuned choice goes to the results folder, not the machine's cache.
step tune 180 "$out/tune.txt" env POSATTN_TUNE_FILE="$out/tune.json" "$posattn" tune \
    --backend "$WGPU_BACKEND" "${tune_args[@]}"
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    step torch-prefill 90 "$out/torch.txt" python3 benches/torch_sdpa.py "${torch_seqs[@]}"
    step torch-decode 90 "$out/torch.txt" python3 benches/torch_sdpa.py --decode "${torch_caches[@]}"
else
    echo "PyTorch with a CUDA device not found: SDPA not run" | tee -a "$log" >"$out/torch.txt"
fi
echo "results in $out" | tee -a "$log"
