#!/usr/bin/env bash
# One prepared run for a GPU machine: correctness, prefill and decode figures, and PyTorch's SDPA
# on the same card, all written to one results folder. Built for a machine without Rust: build
# the binaries here, carry them there.
#
#   benches/gpu.sh build                          # here: release binary into gpu-bin/ (git-ignored)
#   benches/gpu.sh run OUT [--reduced] [--archive FILE]   # there (or here): results in OUT
#
# `run` is planned to end within 8 minutes on an H100/H200: the steps run most important first,
# each under its own time limit (so a hung step cannot eat the rest), and with `--archive FILE`
# the results folder is packed into FILE (.tar.gz) after every step, so that whatever finished
# before a cut-off comes back. It uses WGPU_BACKEND=vulkan unless that is set. `--reduced` is
# the same script at small shapes, to try the whole path on a software adapter (lavapipe) in a
# few minutes; PyTorch is skipped where it finds no CUDA device, and says so.
#
# OUT gets: info.txt (adapter, driver, commit); check_coop.txt and .json (the quick matrix with
# the cooperative-matrix score tile); check_coop_pv.txt and .json (the same with P·V on the
# cooperative matrices too); check_lanes.txt and .json (the quick matrix in the
# lane-split form, 4 lanes per row on the card's subgroups); check_acc16.txt and .json (the
# quick matrix with P·V in f16 arithmetic); check_qwg.txt and .json (the quick matrix with the
# queries in workgroup memory); prefill.txt and .json (`posattn
# bench` at head_dim 64 and 128 on a plain device: the row form, the matmul roof, the unfused
# pipeline, every storage dtype, f32 with 2, 4 and 8 lanes per row, f32 in 128- and
# 256-row query blocks, f16 accumulation in f32 and f16 storage, and f32 with the queries in
# workgroup memory); tune.txt and .json
# (`posattn tune`: every rows × lanes candidate at seq 2048, again with the queries in
# workgroup memory where they hold 128 floats a lane or more, the A/B of the lane-split form,
# and every decode lanes-per-key candidate at cache 8192, then the best and the next larger
# count at 2 and 4 keys a step);
# prefill_tuned.txt and .json (the prefill tables again with the tuned variants);
# prefill_coop.txt and .json (the same on a device opened with cooperative matrices,
# with the coop rows in f32 and f16 storage, the score tile alone and with P·V on the
# cooperative matrices too); decode.txt and .json (`posattn bench --decode`);
# decode_unsplit.txt and .json (batch 1, one split: the split-KV speed-up); decode_rotated.txt
# and .json (keys stored rotated: the per-key rotation's share); decode_lanes.txt and .json
# (4, 8 and 16 lanes per key beside the rule's: registers per lane); decode_keys.txt and .json
# (1, 2 and 4 keys per softmax step at the rule's lanes and at 16); decode_acc16.txt and .json
# (f32 and f16 caches with P·V in f32 and in f16 arithmetic); decode_sweep.txt (batch 1 at
# 16, 64 and 256 splits); torch.txt (benches/torch_sdpa.py, prefill and decode); check.txt and
# .json (`posattn check`, the whole matrix); log.txt (every step's command, exit status and
# time).
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
    out="${2:?usage: benches/gpu.sh run OUT [--reduced] [--archive FILE]}"
    shift 2
    reduced=0
    archive=
    while [ $# -gt 0 ]; do
        case "$1" in
        --reduced) reduced=1 ;;
        --archive) archive="${2:?--archive needs a file}"; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
        esac
        shift
    done
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
    [ -n "$archive" ] && tar czf "$archive" -C "$out" .
    return 0
}

if ((reduced)); then
    check_args=(--quick)
    # --decode-keys: the keys-per-step candidates GPUs time, here on lavapipe too.
    tune_args=(--head-dim 64 --seq 256 --cache 512 --runs 3 --decode-keys)
    seqs=256,512
    dims=64
    caches=512,1024
    sweep_caches=512
    batches=1
    torch_seqs=(512 1024)
    torch_caches=(512 1024)
else
    check_args=()
    tune_args=(--runs 3)
    seqs=512,1024,2048,4096,8192
    dims=64,128
    caches=512,1024,2048,4096,8192,16384,32768
    sweep_caches=512,2048,8192,32768
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
step info 30 "$out/info.txt" "$posattn" info
# Most important first: the cooperative-matrix score tile (tensor cores) checked in the quick
# matrix, then the prefill tables per head size: on a plain device (the row form with the
# matmul roof and the unfused pipeline, then every storage dtype), and on a device opened with
# cooperative matrices (which on Vulkan also switches to the Vulkan memory model), with the
# coop rows in f32 and f16 storage beside the row form.
step check-coop 60 "$out/check_coop.txt" "$posattn" check --backend "$WGPU_BACKEND" --quick \
    --scores coop --json "$out/check_coop.json"
step check-coop-pv 60 "$out/check_coop_pv.txt" "$posattn" check --backend "$WGPU_BACKEND" \
    --quick --scores coop-pv --json "$out/check_coop_pv.json"
step check-lanes 60 "$out/check_lanes.txt" "$posattn" check --backend "$WGPU_BACKEND" --quick \
    --row-lanes 4 --json "$out/check_lanes.json"
step check-acc16 60 "$out/check_acc16.txt" "$posattn" check --backend "$WGPU_BACKEND" --quick \
    --accumulate f16 --json "$out/check_acc16.json"
step check-qwg 60 "$out/check_qwg.txt" "$posattn" check --backend "$WGPU_BACKEND" --quick \
    --q-workgroup --json "$out/check_qwg.json"
step prefill 150 "$out/prefill.txt" "$posattn" bench --backend "$WGPU_BACKEND" --seq "$seqs" \
    --head-dim "$dims" --row-lanes 2,4,8 --block-q 128,256 --accumulate f16 --q-workgroup \
    --json "$out/prefill.json"
# Every rows-per-invocation × lanes-per-row candidate, each checked against the reference
# first; the tuned choice goes to the results folder, not the machine's cache.
step tune 150 "$out/tune.txt" env POSATTN_TUNE_FILE="$out/tune.json" "$posattn" tune \
    --backend "$WGPU_BACKEND" "${tune_args[@]}"
# The prefill tables again with the tuned variants (the context reads tune.json).
step prefill-tuned 90 "$out/prefill_tuned.txt" env POSATTN_TUNE_FILE="$out/tune.json" \
    "$posattn" bench --backend "$WGPU_BACKEND" --seq "$seqs" --head-dim "$dims" \
    --json "$out/prefill_tuned.json"
step prefill-coop 150 "$out/prefill_coop.txt" "$posattn" bench --backend "$WGPU_BACKEND" \
    --seq "$seqs" --head-dim "$dims" --scores coop-pv --json "$out/prefill_coop.json"
step decode 120 "$out/decode.txt" "$posattn" bench --decode --backend "$WGPU_BACKEND" \
    --cache "$caches" --batch "$batches" --json "$out/decode.json"
# Split-KV against one split at batch 1 (the split rule's choice is in decode.txt), f32 and f16.
step decode-unsplit 60 "$out/decode_unsplit.txt" "$posattn" bench --decode \
    --backend "$WGPU_BACKEND" --cache "$caches" --batch 1 --splits 1 --dtype f32,f16 \
    --prefill-max 0 --json "$out/decode_unsplit.json"
# Where a step's time goes: keys stored rotated (no per-key rotation), and forced split counts
# around the rule's choice (BENCHMARKS.md has the H200 sweep that set the rule).
step decode-rotated 60 "$out/decode_rotated.txt" "$posattn" bench --decode \
    --backend "$WGPU_BACKEND" --cache "$caches" --batch "$batches" --dtype f32,f16 \
    --keys-rotated --prefill-max 0 --json "$out/decode_rotated.json"
for s in 16 64 256; do
    step "decode-splits$s" 30 "$out/decode_sweep.txt" "$posattn" bench --decode \
        --backend "$WGPU_BACKEND" --cache "$sweep_caches" --batch 1 --dtype f32 --splits "$s" \
        --prefill-max 0
done
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    step torch-prefill 60 "$out/torch.txt" python3 benches/torch_sdpa.py --head-dim "$dims" \
        "${torch_seqs[@]}"
    step torch-decode 60 "$out/torch.txt" python3 benches/torch_sdpa.py --decode "${torch_caches[@]}"
else
    echo "PyTorch with a CUDA device not found: SDPA not run" | tee -a "$log" >"$out/torch.txt"
fi
# Lanes per key: more lanes hold fewer channels each (at head size 128 and 4 rows, 8 lanes keep
# about 200 floats a lane in registers, 16 about 90), fewer keys run side by side.
step decode-lanes 60 "$out/decode_lanes.txt" "$posattn" bench --decode --backend "$WGPU_BACKEND" \
    --cache "$sweep_caches" --batch "$batches" --dtype f32 --lanes 4,8,16 --prefill-max 0 \
    --json "$out/decode_lanes.json"
# Keys per softmax step: 2 and 4 keys' reads and dot products side by side, one rescale of the
# accumulators per step (the shape of llama.cpp's and FlashInfer's decode kernels), at the
# rule's lanes and at 16 (fewer registers a lane for the step's keys).
step decode-keys 60 "$out/decode_keys.txt" "$posattn" bench --decode --backend "$WGPU_BACKEND" \
    --cache "$sweep_caches" --batch "$batches" --dtype f32 --lanes 16 --keys-per-step 2,4 \
    --prefill-max 0 --json "$out/decode_keys.json"
# P·V in f16 arithmetic in decode (halves each lane's accumulators), f32 and f16 caches.
step decode-acc16 60 "$out/decode_acc16.txt" "$posattn" bench --decode --backend "$WGPU_BACKEND" \
    --cache "$sweep_caches" --batch "$batches" --dtype f32,f16 --accumulate f16 --prefill-max 0 \
    --json "$out/decode_acc16.json"
# The whole conformance matrix in the row form.
step check 150 "$out/check.txt" "$posattn" check --backend "$WGPU_BACKEND" "${check_args[@]}" \
    --json "$out/check.json"
echo "results in $out" | tee -a "$log"
[ -n "$archive" ] && tar czf "$archive" -C "$out" .
exit 0
