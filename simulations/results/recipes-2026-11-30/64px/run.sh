#!/bin/bash
# transfer + snapshot ensemble at 64 px, 300 studies a hospital, 10 rounds (the probe's size)
set -u
cd /work/wt/measure; export PYTHONPATH=$PWD
R="nice -n 10 /work/main/.venv/bin/radfl"
M=.radfl/m
S="--model small-cnn --set image-size=64 --set local-epochs=2 --set batch-size=16 --set min-cell-size=5"
t() { local name=$1; shift; local t0=$(date +%s); "$@" > $M/$name.log 2>&1; echo "$name rc=$? wall=$(( $(date +%s)-t0 ))s" >> $M/times.txt; }
rid() { grep -o "MLflow run [0-9a-f]\{32\}" $M/$1.log | head -1 | awk '{print $3}'; }
t synth64 $R synth --out $M/E --sites 4 --samples-per-site 300 --image-size 64
mkdir -p $M/E1 $M/E2; ln -sfn $PWD/$M/E/site-3 $M/E1/site-0
for i in 0 1 2; do ln -sfn $PWD/$M/E/site-$i $M/E2/site-$i; done
t pre64 $R centralized --data $M/E1 --sites 1 --rounds 6 --seed 0 $S
PRE=$(rid pre64); echo "PRE64=$PRE" >> $M/ids.txt
t rand64 $R simulate --data $M/E2 --sites 3 --rounds 10 --seed 0 $S --set snapshot-models=3
A=$(rid rand64); echo "RAND64=$A" >> $M/ids.txt
t xfer64 $R simulate --data $M/E2 --sites 3 --rounds 10 --seed 0 $S --set initial-weights=$PRE
echo "XFER64=$(rid xfer64)" >> $M/ids.txt
t ens_snap64 $R ensemble $A --snapshots 3 --data $M/E2 --sites 3 $S --out $M/ens-snapshots64

. <(sed 's/^/export /' $M/ids.txt)
t rand64s1 $R simulate --data $M/E2 --sites 3 --rounds 10 --seed 1 $S
echo "RAND64S1=$(rid rand64s1)" >> $M/ids.txt
t xfer64s1 $R simulate --data $M/E2 --sites 3 --rounds 10 --seed 1 $S --set initial-weights=$PRE64
echo "XFER64S1=$(rid xfer64s1)" >> $M/ids.txt
. <(sed 's/^/export /' $M/ids.txt)
t ens_seeds_rand64 $R ensemble $RAND64 $RAND64S1 --data $M/E2 --sites 3 $S --out $M/ens-seeds64
t ens_seeds_xfer64 $R ensemble $XFER64 $XFER64S1 --data $M/E2 --sites 3 $S --out $M/ens-seeds-xfer64

# probe (in-memory hospitals):
t probe64 $R simulate --in-memory --sites 3 --rounds 10 --seed 0 --model small-cnn --set image-size=64 --set synthetic-samples-per-site=300 --set local-epochs=2 --set batch-size=16 --set min-cell-size=5
