#!/bin/sh
# Trains stand-in v2 in the background, niced, in two stages from v1 (models/austen-byte-6l-h64.bin):
#   1. copy: half the rows text, half `repeat` rows (a random-letter span repeated: a dense copying
#      signal) and random-word copies, 700 steps at 128 tokens, constant lr 1e-3. The copying
#      (induction) circuit forms around step 500-600 while the text rows keep the language.
#   2. mix: text with passkey, copy, random-word copy, multi-key recall (single and dense rows, the
#      question `Code K456=`) and repeat rows from 128 to 1024 tokens, 2400 steps, 40% of them at
#      1024, which puts copying to use at full context.
# Fixed step counts: reproducible. Logs next to the checkpoints. Where it stands: README.md.
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
  train $v2-stage1 "$out/austen-byte-6l-h64.bin" $v2-stage1.train.log \
    --tasks repeat:3,copy_random:1 --schedule 1.0:128:32:0.5:1 --steps 700 --lr 1e-3 \
    --min_lr 1e-3 --warmup 20
  train $v2 "$out/$v2-stage1.bin" $v2.train.log \
    --tasks passkey:1,copy:2,copy_random:2,recall:2,recall_dense:1,repeat:1 \
    --schedule 0.2:128:16:0.7:3,0.4:256:8:0.6:3,0.6:512:4:0.6:2,1.0:1024:2:0.6:2 --steps 2400 \
    --lr 1e-3 --min_lr 1e-4 --warmup 50 --eval_every 200 "$@"
) &
echo "training in the background (pid $!), logs: $out/$v2*.train.log"
