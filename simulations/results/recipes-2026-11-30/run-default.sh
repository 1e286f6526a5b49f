#!/bin/bash
# the plain default config (3 local epochs, batch 32, lr 1e-3) at the tuning size, seed 0
set -u
cd /work/wt/measure; export PYTHONPATH=$PWD
R="nice -n 10 /work/main/.venv/bin/radfl"
M=.radfl/m
T="--model small-cnn --set image-size=32 --set min-cell-size=5"
t() { local name=$1; shift; local t0=$(date +%s); "$@" > $M/$name.log 2>&1; echo "$name rc=$? wall=$(( $(date +%s)-t0 ))s" >> $M/times.txt; }
t default0 $R simulate --data $M/D2 --sites 3 --rounds 8 --seed 0 $T
