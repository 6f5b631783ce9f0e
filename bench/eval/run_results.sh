#!/bin/sh
# Regenerates docs/results/: verifies the shared data against SHA256SUMS, then runs skv-eval on
# stories260K (plumbing), the stand-in (models/) on held-out Austen and WikiText-2, and, when it
# exists, stand-in v2 and its -outlier variant (made here by skv-outlier-model) on held-out Austen.
# Run from the repository root after building skv-eval and skv-outlier-model:
#   cmake -S . -B build-eval -G Ninja -DSKV_WITH_CUDA=OFF   # -DSKV_BUILD_SERVER=OFF: no daemon path
#   ninja -C build-eval skv-eval skv-outlier-model
#   bench/eval/run_results.sh [stories|standin|v2|all]
set -eu
which="${1:-all}"
data="${SKV_DATA_DIR:-../shared/data}"
eval_bin="${SKV_EVAL:-build-eval/bin/skv-eval}"
outlier_bin="${SKV_OUTLIER_MODEL:-$(dirname "$eval_bin")/skv-outlier-model}"
out=docs/results
windows_small="${WINDOWS_SMALL:-64}"
windows_standin="${WINDOWS_STANDIN:-48}"
trials_standin="${TRIALS_STANDIN:-4}"
mkdir -p "$out"
(cd "$data" && sha256sum --quiet -c SHA256SUMS) || { echo "shared data does not match SHA256SUMS" >&2; exit 1; }

run() {  # name model tokenizer text tail windows passkey_trials
  name=$1; model=$2; tok=$3; text=$4; tail=$5; windows=$6; trials=$7
  nice -n 10 "$eval_bin" --model "$model" --tokenizer "$tok" --text "$text" --text_tail "$tail" \
    --windows "$windows" --passkey_trials "$trials" \
    --json_out "$out/$name.json" --markdown "$out/$name.md" --plot "$out/$name.png"
}

if [ "$which" = stories ] || [ "$which" = all ]; then
  run stories260K-wikitext2 "$data/models/stories260K.bin" "$data/models/tok512.bin" \
    "$data/text/wikitext2-test.raw" 1 "$windows_small" 2
  run stories260K-austen-heldout "$data/models/stories260K.bin" "$data/models/tok512.bin" \
    "$data/text/janeausten" 0.1 "$windows_small" 2
fi
if [ "$which" = standin ] || [ "$which" = all ]; then
  (cd models && sha256sum --quiet -c SHA256SUMS)
  run austen-byte-6l-h64-austen-heldout models/austen-byte-6l-h64.bin models/byte259.tok.bin \
    "$data/text/janeausten" 0.1 "$windows_standin" "$trials_standin"
  run austen-byte-6l-h64-wikitext2 models/austen-byte-6l-h64.bin models/byte259.tok.bin \
    "$data/text/wikitext2-test.raw" 1 "$windows_standin" "$trials_standin"
fi
v2=models/austen-byte-6l-h64-v2.bin
if { [ "$which" = v2 ] || [ "$which" = all ]; } && [ -f "$v2" ]; then
  (cd models && sha256sum --quiet -c SHA256SUMS)
  outlier=$(mktemp -d)/austen-byte-6l-h64-v2-outlier.bin
  "$outlier_bin" --in "$v2" --out "$outlier"
  for m in "$v2" "$outlier"; do
    run "$(basename "$m" .bin)-austen-heldout" "$m" models/byte259.tok.bin \
      "$data/text/janeausten" 0.1 "$windows_standin" "$trials_standin"
  done
  rm -r "$(dirname "$outlier")"
fi
