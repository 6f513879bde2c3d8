#!/usr/bin/env bash
# The whole pipeline, offline, on CPU, in 8-19 minutes on 2 cores (the measured times, stage by stage and against the
# quickstart before it trained on latents, are in the README's Quick start; `make quickstart` puts the venv on PATH):
#   1. ldm-data:   4000 + 200 captioned `shapes` images at 32 px as WebDataset shards: one large shape in the centre,
#                  drawn 1.7 times the default size (22 px across, so a star, a hexagon and a circle differ by
#                  several pixels), with the 4 sample prompts held out of the training split
#   2. ldm-train:  experiment=quickstart_vae  -> the tiny KL-f2 autoencoder and its latent statistics, and, side by
#                  side with it on the other core,
#      ldm-train:  experiment=quickstart_clip -> a byte-level text encoder pretrained contrastively on the pairs
#   3. ldm-encode: both splits -> latent shards (the autoencoder's posterior moments and the frozen text encoder's
#                  outputs), so that stage 4 runs neither encoder
#   4. ldm-train:  experiment=quickstart_ldm on the latent shards, read in the training process and kept in memory
#                  after the first epoch -> a tiny text-to-image LDM conditioned by that encoder
#   5. ldm-sample: the 4 held-out prompts x 4 seeds -> runs/quickstart/samples/grid.png
#   6. ldm-eval:   shapes_color_accuracy and shapes_shape_accuracy of 512 samples of validation captions (offline
#                  colour and shape read-out, no weights)
# Everything is written under runs/quickstart/; running it again starts over.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=runs/quickstart
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
NUM_SAMPLES=4000
SEED=0
SHAPES_LAYOUT=(sizes='[large]' positions='[center]' scale=1.7)
# Held out of the training split (ldm-data holdout=..., checked below): every attribute is familiar, the combination
# is new.
PROMPTS=(
  "a large yellow triangle in the center on a white background"
  "a large cyan circle in the center on a black background"
  "a large pink diamond in the center on a gray background"
  "a large orange star in the center on a gray background"
)
PROMPT_LIST="[$(IFS=,; echo "${PROMPTS[*]}")]"
START=$SECONDS
stage() { echo; echo "=== $1 ($(( SECONDS - START )) s elapsed)"; }

rm -rf "$OUT"
mkdir -p "$OUT"

# Every stage runs as background jobs, so that a signal to the script reaches them at once. Commands that need only
# what is already written run side by side, each on half the cores (these small models use a second thread poorly:
# 2 threads ran the autoencoder step 1.3x and the contrastive step 1.2x faster than one). `start NAME CMD...` runs CMD
# with its output in $OUT/NAME.log; `show NAME CMD...` on all cores, its output also on the terminal; `finish` waits
# for them and, as soon as one fails, stops the others and the quickstart, showing the failed one's log. Ctrl-C (or a
# SIGTERM, SIGHUP to the script) stops the running commands (the trainers save last.ckpt) and the quickstart, with
# status 130 (143, 129): nothing after it runs.
CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)  # (macOS has no nproc)
THREADS=$(( CORES / 2 > 0 ? CORES / 2 : 1 ))
PIDS=(); NAMES=()
start() {
  local name=$1; shift
  OMP_NUM_THREADS=$THREADS "$@" > "$OUT/$name.log" 2>&1 &
  PIDS+=($!); NAMES+=("$name")
}
show() {
  local name=$1; shift
  "$@" > >(trap '' INT TERM HUP; exec tee "$OUT/$name.log") 2>&1 &  # tee outlives a signal: the last lines reach the log
  PIDS+=($!); NAMES+=("+$name")  # +: its output is on the terminal already
}
stop_all() { kill -TERM "${PIDS[@]}" 2>/dev/null || true; wait "${PIDS[@]}" 2>/dev/null || true; }
interrupted() {
  trap - INT TERM HUP
  stop_all
  echo "quickstart: interrupted by SIG$1; nothing after it ran (runs/quickstart holds what was written)" >&2
  exit "$2"
}
trap 'interrupted INT 130' INT
trap 'interrupted TERM 143' TERM
trap 'interrupted HUP 129' HUP
finish() {
  local i status name
  while (( ${#PIDS[@]} )); do
    for i in "${!PIDS[@]}"; do
      kill -0 "${PIDS[$i]}" 2>/dev/null && continue  # still running
      status=0; wait "${PIDS[$i]}" || status=$?
      name=${NAMES[$i]#+}
      if (( status )); then
        [[ ${NAMES[$i]} == +* ]] || tail -n 20 "$OUT/$name.log" || true
        echo "quickstart: $name failed; its log: $OUT/$name.log" >&2
        unset 'PIDS[i]'
        stop_all
        exit 1
      fi
      [[ ${NAMES[$i]} == +* ]] || tail -n 1 "$OUT/$name.log"
      unset 'PIDS[i]' 'NAMES[i]'
    done
    (( ${#PIDS[@]} )) && sleep 0.2
  done
  PIDS=(); NAMES=()
}

stage "1/6 shapes shards"
show data ldm-data source=shapes output_dir="$OUT/data" num_samples=$NUM_SAMPLES val_samples=200 resolution=32 \
  seed=$SEED "${SHAPES_LAYOUT[@]}" holdout="$PROMPT_LIST"
finish

python - "$OUT/data" "${PROMPTS[@]}" <<'PY'
import sys
import tarfile
from pathlib import Path
data, prompts = Path(sys.argv[1]), sys.argv[2:]
captions = set()
for shard in sorted(data.glob("train-*.tar")):
    with tarfile.open(shard) as tar:
        captions.update(tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt"))
seen = [p for p in prompts if p in captions]
if seen:
    sys.exit(f"prompts meant to be held out occur in the training shards: {seen}")
print(f"held out: none of the {len(prompts)} sample prompts is among the {len(captions)} distinct training captions")
PY

DATA=(data.train_shards="$OUT/data/train-*.tar" data.val_shards="$OUT/data/val-*.tar")
COMMON=(logger=csv callbacks.progress=null)

stage "2/6 autoencoder (experiment=quickstart_vae) and text encoder (experiment=quickstart_clip), side by side"
start vae ldm-train experiment=quickstart_vae paths.output_dir="$OUT/vae" "${DATA[@]}" "${COMMON[@]}"
start clip ldm-train experiment=quickstart_clip paths.output_dir="$OUT/clip" "${DATA[@]}" "${COMMON[@]}"
finish

stage "3/6 latents and text encodings of both splits (ldm-encode)"
for split in train val; do
  start "encode-$split" ldm-encode shards="$OUT/data/$split-*.tar" output_dir="$OUT/latents/$split" \
    autoencoder_path="$OUT/vae/export" text_encoder="{kind: byte, name_or_path: $OUT/clip/export}" progress=false
done
finish

stage "4/6 latent diffusion on the latents (experiment=quickstart_ldm)"
show ldm ldm-train experiment=quickstart_ldm paths.output_dir="$OUT/ldm" model.autoencoder_path="$OUT/vae/export" \
  model.conditioner.name_or_path="$OUT/clip/export" data.train_shards="$OUT/latents/train/train-*.tar" \
  data.val_shards="$OUT/latents/val/val-*.tar" data.num_workers=0 data.cache_in_memory=true "${COMMON[@]}"
finish

stage "5/6 samples of held-out prompts"
show sample ldm-sample ckpt_path="$OUT/ldm/export" prompts="$PROMPT_LIST" sampler=dpmpp_2m num_steps=20 \
  guidance_scale=3.5 seed=0 num_images_per_prompt=4 batch_size=16 output_dir="$OUT/samples" device=cpu
finish

stage "6/6 prompt adherence (ldm-eval metrics=[shapes_color_accuracy,shapes_shape_accuracy])"
mkdir -p "$OUT/eval"
show eval/summary ldm-eval ckpt_path="$OUT/ldm/export" output_dir="$OUT/eval" val_shards="$OUT/data" num_samples=512 \
  batch_size=128 'samplers=[dpmpp_2m]' 'num_steps=[20]' 'guidance_scales=[3.5]' \
  'metrics=[shapes_color_accuracy,shapes_shape_accuracy]'
finish

echo
echo "quickstart finished in $(( SECONDS - START )) s"
echo "autoencoder:       $OUT/vae/export (reconstructions in $OUT/vae/images)"
echo "text encoder:      $OUT/clip/export"
echo "diffusion model:   $OUT/ldm/export, EMA pipeline (checkpoint: $OUT/ldm/checkpoints/last.ckpt; grids in $OUT/ldm/images)"
echo "samples:           $OUT/samples/grid.png (one row per prompt, 4 seeds each; images and sample.json beside it)"
printf '  row %s\n' "${PROMPTS[@]}"
echo "evaluation:        $OUT/eval/results.csv (protocol and metrics; chance: colour 1/8, shape 1/7)"
grep -h "^shapes_" "$OUT/eval/summary.log"
