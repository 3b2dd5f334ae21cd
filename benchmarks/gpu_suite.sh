#!/usr/bin/env bash
# The long quality runs of the three developments, in parallel on one GPU machine with many cores.
#
#   bash benchmarks/gpu_suite.sh RESULTS_DIR [MINUTES]
#
# RESULTS_DIR  folder for every JSON, log and figure (created); packed into RESULTS_DIR.tar.gz at the end
# MINUTES      training budget of each DL-CFM in the halo runs (default 3.5; its Aux-VAE: 1.5)
#
# First benchmarks/cuda_smoke.py checks every model verb on the GPU. Then, on the GPU at once:
#   - dlcfm_halos.py: DL-CFM against an Aux-VAE of the same latent size on 10240 halo maps
#     (8192 training, 2048 held out): 32x32 in two intensity transforms and with a wider
#     vector field, and 64x64;
#   - auxvae_quality.py on `sources` (8192 training, 4096 fresh held-out images) for 100 epochs,
#     with the plain-VAE baseline and half the auxiliaries masked, at two network sizes; and the
#     Aux-VAE alone for 200 epochs.
# Each job writes its own log and is stopped after JOB_SECONDS (default 480); one failing job does
# not stop the others. The whole suite takes about 8 minutes on one H200 with 16 cores.
set -u
out=${1:?usage: gpu_suite.sh RESULTS_DIR [MINUTES]}
minutes=${2:-3.5}
limit=${JOB_SECONDS:-480}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
pids=()
"$py" "$here/cuda_smoke.py" --device cuda 2>&1 | tee "$out/cuda_smoke.log"

job() { # job NAME COMMAND...: run in the background, output to NAME.log
    local name=$1
    shift
    (timeout "$limit" "$@" >"$out/$name.log" 2>&1; echo "exit $?" >>"$out/$name.log") &
    pids+=($!)
}

halos() { # halos NAME EXTRA_ARGS...
    local name=$1
    shift
    job "$name" "$py" "$here/dlcfm_halos.py" --num 10240 --held-out 0.2 --epochs 400 \
        --train-minutes "$minutes" --auxvae-minutes 1.5 --device cuda --run-dir "$out/$name" \
        --output "$out/$name.json" "$@"
}

halos halos32 --size 32 --tau 0.1 --align-weight 1.0 --decor-weight 5.0
halos halos32_asinh --size 32 --tau 0.1 --align-weight 1.0 --decor-weight 5.0 --intensity asinh
halos halos32_wide --size 32 --tau 0.1 --align-weight 1.0 --decor-weight 5.0 \
    --field-channels 64
halos halos64 --size 64 --tau 0.1 --align-weight 1.0 --decor-weight 5.0

quality() { # quality NAME EXTRA_ARGS...
    local name=$1
    shift
    job "$name" "$py" "$here/auxvae_quality.py" --dataset sources --num 8192 --test-num 4096 \
        --device cuda --out "$out/$name.json" "$@"
}

quality sources100 --epochs 100 --baseline --mask-fraction 0.5
quality sources100_wide --epochs 100 --baseline --mask-fraction 0.5 \
    --model-kwargs '{"width": 64, "hidden": 512}'
quality sources200 --epochs 200

for pid in "${pids[@]}"; do
    wait "$pid"
done
for log in "$out"/*.log; do
    echo "== $(basename "$log")"
    grep -E "^ *(auxvae|plain|masked):|FAIL|pass$|per epoch|Error|exit " "$log" | tail -20
done
"$py" "$here/summarize_halos.py" "$out"/halos*.json
tar -czf "$out.tar.gz" --exclude='*.pt' -C "$(dirname "$out")" "$(basename "$out")"
echo "packed $out.tar.gz"
