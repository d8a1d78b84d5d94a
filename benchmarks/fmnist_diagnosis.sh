#!/usr/bin/env bash
# Train a small EDM model on Fashion-MNIST on CPU, sample it, score it (FID and the classifier
# Fréchet distance) and diagnose its per-σ gap to the optimal loss. Results go to docs/results/.
# Resumable: rerunning continues the training run where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/lossfloor
RUN=${RUN:-runs/fmnist-edm-tiny}
STEPS=${STEPS:-1500}
OUT=docs/results
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

[ -f $OUT/fmnist-full.json ] || $L estimate --data fashion-mnist --sigmas 0.02:80:20 \
    --outer 10000 --total edm --out $OUT/fmnist-full.json --plot $OUT/fmnist-full.png
resume=""; [ -f $RUN/checkpoint-latest.pt ] && resume="--resume"
$L train --data fashion-mnist --run-dir $RUN --steps $STEPS --batch 64 --model tiny \
    --process edm --target F --schedule edm --seed 0 --checkpoint-every 250 --log-every 25 \
    --monitor $OUT/fmnist-full.json --monitor-every 250 --monitor-sigmas 0.5,2,10 \
    --no-progress $resume
$L sample --run $RUN --n 2000 --steps 18 --sampler heun --seed 0 \
    --out-npz $RUN/samples.npz --out-grid $OUT/fmnist-samples.png --no-progress
$L fid --samples $RUN/samples.npz --data fashion-mnist --feature classifier \
    --n-reference 10000 --out $OUT/fmnist-fd-classifier.json --quiet
$L fid --samples $RUN/samples.npz --n 500 --data fashion-mnist --feature inception \
    --out $OUT/fmnist-fid-inception.json --quiet
$L diagnose --model $RUN --data fashion-mnist --sigmas 0.2,0.5,1,2,3,5,10,20 --outer 2048 \
    --out $OUT/fmnist-diagnosis.json --plot $OUT/fmnist-diagnosis.png
