#!/bin/bash
# all measurements: pre-train on hospital 3, federate on hospitals 0-2
set -u
cd /work/wt/measure; export PYTHONPATH=$PWD
R="nice -n 10 /work/main/.venv/bin/radfl"
M=.radfl/m
S="--model small-cnn --set image-size=32 --set local-epochs=2 --set batch-size=16 --set min-cell-size=5"
T="--model small-cnn --set image-size=32 --set min-cell-size=5"
t() { local name=$1; shift; local t0=$(date +%s); "$@" > $M/$name.log 2>&1; echo "$name rc=$? wall=$(( $(date +%s)-t0 ))s" >> $M/times.txt; }
rid() { grep -o "MLflow run [0-9a-f]\{32\}" $M/$1.log | head -1 | awk '{print $3}'; }
t pre $R centralized --data $M/D1 --sites 1 --rounds 8 --seed 0 $S
PRE=$(rid pre); echo "PRE=$PRE" >> $M/ids.txt
t rand0 $R simulate --data $M/D2 --sites 3 --rounds 8 --seed 0 $S --set snapshot-models=3
A=$(rid rand0); echo "RAND0=$A" >> $M/ids.txt
t xfer0 $R simulate --data $M/D2 --sites 3 --rounds 8 --seed 0 $S --set initial-weights=$PRE
echo "XFER0=$(rid xfer0)" >> $M/ids.txt
t ens_snap0 $R ensemble $A --snapshots 3 --data $M/D2 --sites 3 $S --out $M/ens-snapshots
t tune $R tune --trials 4 --data $M/D2 --sites 3 --rounds 8 --seed 0 $T --output $M/tuned.toml
t rand1 $R simulate --data $M/D2 --sites 3 --rounds 8 --seed 1 $S
echo "RAND1=$(rid rand1)" >> $M/ids.txt
t xfer1 $R simulate --data $M/D2 --sites 3 --rounds 8 --seed 1 $S --set initial-weights=$PRE
echo "XFER1=$(rid xfer1)" >> $M/ids.txt
. <(sed 's/^/export /' $M/ids.txt)
t ens_seeds_rand $R ensemble $RAND0 $RAND1 --data $M/D2 --sites 3 $S --out $M/ens-seeds
t ens_seeds_xfer $R ensemble $XFER0 $XFER1 --data $M/D2 --sites 3 $S --out $M/ens-seeds-xfer
