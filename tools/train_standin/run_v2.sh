#!/bin/sh
# Trains stand-in v2 in the background, niced: v1 (models/austen-byte-6l-h64.bin) warm-started on
# text mixed with passkey, copy and recall rows, so that it uses its context (copy and multi-key
# recall, not just a passkey). Fixed step count: reproducible. Log next to the checkpoint.
# Usage: tools/train_standin/run_v2.sh [extra train.py flags]
set -e
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../models"
OMP_NUM_THREADS=1 nohup nice -n 10 /usr/bin/python3 "$here/train.py" --out_dir "$out" \
  --name austen-byte-6l-h64-v2 --init "$out/austen-byte-6l-h64.bin" \
  --tasks passkey:1,copy:2,copy_random:2,recall:3 \
  --schedule 0.4:128:16:0.8:5,0.6:256:8:0.7:3,0.8:512:4:0.6:2,1.0:1024:2:0.6:2 --steps 3500 \
  --lr 1e-3 --min_lr 1e-4 --warmup 100 "$@" > "$out/austen-byte-6l-h64-v2.train.log" 2>&1 &
echo "training in the background (pid $!), log: $out/austen-byte-6l-h64-v2.train.log"
