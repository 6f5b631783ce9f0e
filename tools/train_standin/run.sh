#!/bin/sh
# Trains the stand-in in the background, niced, logging JSON lines next to the checkpoint.
# Usage: tools/train_standin/run.sh [extra train.py flags]
# The committed checkpoint was made by `tools/train_standin/run.sh` with no extra flags (the
# defaults of train.py are the recipe); its log starts with every setting used.
set -e
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../models"
mkdir -p "$out"
OMP_NUM_THREADS=1 nohup nice -n 10 /usr/bin/python3 "$here/train.py" --out_dir "$out" "$@" \
  > "$out/austen-byte-6l-h64.train.log" 2>&1 &
echo "training in the background (pid $!), log: $out/austen-byte-6l-h64.train.log"
