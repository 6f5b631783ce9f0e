#!/bin/sh
# Trains stand-in v2 in the background, niced, in two stages from v1 (models/austen-byte-6l-h64.bin):
#   1. repeat: rows that repeat a random-letter span (a dense copying signal), 500 steps with the
#      learning rate decaying from 1e-3 to 5e-4, then 400 at a constant 1e-3. The copying
#      (induction) circuit forms in the second part (the copy loss falls from 2.9 to 0.16 nats per
#      byte between its steps 80 and 240); language modelling is lost meanwhile.
#   2. mix: text with passkey, copy, random-word copy, multi-key recall and repeat rows from 128 to
#      1024 tokens, which brings language modelling back and puts copying to use in context.
# Fixed step counts: reproducible. Logs next to the checkpoints.
# Usage: tools/train_standin/run_v2.sh [extra train.py flags for stage 2]
set -e
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../models"
train() {  # name init log [train.py flags]
  name=$1 init=$2 log=$3
  shift 3
  OMP_NUM_THREADS=1 nice -n 10 /usr/bin/python3 "$here/train.py" --out_dir "$out" --name "$name" \
    --init "$init" "$@" > "$out/$log" 2>&1
}
v2=austen-byte-6l-h64-v2
(
  train $v2-stage1a "$out/austen-byte-6l-h64.bin" $v2-stage1a.train.log --tasks repeat:1 \
    --schedule 1.0:128:32:1.0:1 --steps 500 --lr 1e-3 --min_lr 5e-4 --warmup 20
  train $v2-stage1b "$out/$v2-stage1a.bin" $v2-stage1b.train.log --tasks repeat:1 \
    --schedule 1.0:128:32:1.0:1 --steps 400 --lr 1e-3 --min_lr 1e-3 --warmup 1 --eval_every 200
  train $v2 "$out/$v2-stage1b.bin" $v2.train.log \
    --tasks passkey:1,copy:2,copy_random:2,recall:3,repeat:1 \
    --schedule 0.3:128:16:0.8:3,0.55:256:8:0.7:3,0.8:512:4:0.6:2,1.0:1024:2:0.6:2 --steps 2000 \
    --lr 1e-3 --min_lr 1e-4 --warmup 50 "$@"
) &
echo "training in the background (pid $!), logs: $out/$v2*.train.log"
