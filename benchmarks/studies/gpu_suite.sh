#!/usr/bin/env bash
# The long quality runs of the three developments, in parallel on one GPU machine with many cores.
#
#   bash benchmarks/studies/gpu_suite.sh RESULTS_DIR [MINUTES]
#
# RESULTS_DIR  folder for every JSON, log and figure (created); packed into RESULTS_DIR.tar.gz at the end
# MINUTES      training budget of each DL-CFM in the halo runs (default 3.5; its Aux-VAE: 1.5)
#
# First benchmarks/timing/cuda_smoke.py checks every model verb on the GPU. Then, side by side:
#   - dlcfm_halos.py, one after the other: DL-CFM against an Aux-VAE of the same latent size on
#     10240 halo maps (8192 training, 2048 held out), 32x32, identity and asinh intensities;
#   - auxvae_quality.py on `sources` (8192 training, 4096 fresh held-out images) for 100 epochs,
#     with the plain-VAE baseline and half the auxiliaries masked.
# Each run writes its own log and is stopped after JOB_SECONDS (default 480); one failing run
# does not stop the others. Estimated at about 12 minutes on one H200 (this layout not yet run).
set -u
out=${1:?usage: gpu_suite.sh RESULTS_DIR [MINUTES]}
minutes=${2:-3.5}
limit=${JOB_SECONDS:-480}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
pids=()
"$py" "$here/../timing/cuda_smoke.py" --device cuda 2>&1 | tee "$out/cuda_smoke.log"

halos() { # halos NAME EXTRA_ARGS...: one halo run (in the foreground)
    local name=$1
    shift
    timeout "$limit" "$py" "$here/dlcfm_halos.py" --num 10240 --held-out 0.2 --epochs 400 \
        --train-minutes "$minutes" --auxvae-minutes 1.5 --device cuda --threads 2 \
        --run-dir "$out/$name" --output "$out/$name.json" "$@" >"$out/$name.log" 2>&1
    echo "exit $?" >>"$out/$name.log"
}

quality() { # quality NAME EXTRA_ARGS...: one sources quality run (in the foreground)
    local name=$1
    shift
    timeout "$limit" "$py" "$here/auxvae_quality.py" --dataset sources --num 8192 \
        --test-num 4096 --device cuda --threads 2 --out "$out/$name.json" "$@" >"$out/$name.log" 2>&1
    echo "exit $?" >>"$out/$name.log"
}

# Two processes share the GPU: 7 at once made each about 2.5x slower than alone (time slicing).
(
    halos halos32 --size 32 --tau 0.1 --align-weight 1.0 --decor-weight 5.0
    halos halos32_asinh --size 32 --tau 0.1 --align-weight 1.0 --decor-weight 5.0 \
        --intensity asinh
) &
pids+=($!)
quality sources100 --epochs 100 --baseline --mask-fraction 0.5 &
pids+=($!)

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
