#!/usr/bin/env bash
# The real CPU runs behind results/RESULTS.md: exact commands, in order. Each stage writes its run folder under
# runs/recipes/ (checkpoints, logs, exports: not committed) and its small outputs (summaries, per-image CSVs, grids)
# under results/. Run everything, or name stages:
#   scripts/run_recipes.sh                       # all stages, sequentially
#   scripts/run_recipes.sh taesd mlp             # some of them
# Stages: default cache taesd taesd_eval taesd_curve mlp mlp_eval vae16 vae16_eval noattn noattn_eval fp16 fp16_eval
# bench collect (fp16 = overflow teacher + audit + fp16_train; mlp_eval_bsds: the BSDS half of mlp_eval). Later stages
# use earlier outputs (noattn and fp16 need vae16). The decoder recipes build their latent cache themselves
# (data.latent_cache=auto, under runs/recipes/latent_cache); stage cache is the explicit build results/mlp_taef2 used. Sized for 2 CPU cores shared with other jobs; under such sharing torch runs FASTER with one
# thread per process (two threads spin-wait on a busy machine), hence OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
A=${VAETRAIN_ASSETS:-$(cd "$ROOT/.." && pwd)/shared/assets}
R=runs/recipes
OUT=results
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$R" "$OUT"

# time a command, keep its full log, and record its wall time in results/timings.tsv
t() {
  local name=$1; shift
  echo "+ $*" | tee "$R/$name.log"
  local t0=$SECONDS
  "$@" >>"$R/$name.log" 2>&1
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$*" >>"$OUT/timings.tsv"
  tail -n 12 "$R/$name.log"
}

# images per eval set: all 24 of Kodak, the first 50 (sorted) of the 100 BSDS500 val photos (CPU time)
declare -A LIMIT=([kodak24]=null [bsds500_val]=50)
eval_on() {  # eval_on NAME MODEL_SOURCE SET [extra overrides...]: student (and teacher) on one eval set at 256 px
  local name=$1 model=$2 set=$3; shift 3
  t "eval_${name}_${set}" vaetrain eval "model.source=$model" "folder=$A/images/eval/$set" size=256 batch_size=4 \
    "limit=${LIMIT[$set]}" grid=4 grid_tile=128 "out=$OUT/$name/$set" "$@"
}

stage_default() {  # the no-argument job (two torch threads: it was measured on the idle machine) + the 4x floor
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 t default vaetrain train run_dir=$R/default
  mkdir -p $OUT/default
  python scripts/resample_baseline.py --size 32 --factor 4 >$OUT/default/resample_baseline.json
}

stage_cache() {  # the TAEF2 latents of images/train at 128 px, once (recipe 2 trains from them)
  t cache_taef2_128 vaetrain cache-latents teacher=taef2 output=$R/cache_taef2_128 data.image_size=128 \
    data.num_workers=0 device=cpu
}

stage_taesd() {  # recipe 1 real run: TAEF2 -> fresh TAESD flux_2 decoder (Seraena GAN, cached latents), every step logged
  # results/taesd_taef2 holds the previous run of this stage (GAN from step 400, teacher encoder every step)
  t taesd_taef2_seraena vaetrain train experiment=taesd_taef2 run_dir=$R/taesd_taef2_seraena trainer.log_every_n_steps=1
}
stage_taesd_eval() {
  for set in kodak24 bsds500_val; do
    eval_on taesd_taef2_seraena "$R/taesd_taef2_seraena/export/original" $set teacher=taef2
  done
}
stage_taesd_curve() {  # per-step convergence: train_curve.csv + curve.png beside the previous run's validation points
  python scripts/convergence_curve.py --metrics $R/taesd_taef2_seraena/logs/metrics.csv --out $OUT/taesd_taef2_seraena \
    --compare $OUT/taesd_taef2/val_curve.csv --compare-label "previous run, validation"
}

stage_mlp() {  # recipe 2 real run: TAEF2 -> Birch-san MLP (+ learned 8x upsampler), from the latent cache of stage cache
  # (the recipe alone, without data=cached, builds the same cache itself under $R/latent_cache)
  t mlp_taef2 vaetrain train experiment=mlp_decoder_taef2 data=cached data.shards=$R/cache_taef2_128 run_dir=$R/mlp_taef2
}
stage_mlp_eval() {
  for set in kodak24 bsds500_val; do eval_on mlp_taef2 "$R/mlp_taef2/export/original" $set teacher=taef2; done
}
stage_mlp_eval_bsds() {  # the second half of mlp_eval alone
  eval_on mlp_taef2 "$R/mlp_taef2/export/original" bsds500_val teacher=taef2
}

stage_vae16() {  # recipe 6 real run: 16-channel KL autoencoder with attention from scratch, then its latent statistics
  t vae16 vaetrain train experiment=vae16_cpu run_dir=$R/vae16
}
stage_vae16_eval() {
  eval_on vae16 "$R/vae16/export/original.safetensors" kodak24
  t latent_stats vaetrain latent-stats "model.source=$R/vae16/export/original.safetensors" \
    "folder=$A/images/train" size=64 limit=512 "out=$OUT/vae16/latent_stats.json"
}

stage_noattn() {  # recipe 5 real run: vae16 without its midblock attention, before and after finetuning
  t noattn_convert vaetrain convert "$R/vae16/export/original.safetensors" "$R/vae16_no_attn_untrained" \
    format=original allow_drop_attention=true
  t noattn vaetrain train experiment=no_midblock_attn_cpu run_dir=$R/no_attn
}
stage_noattn_eval() {
  local teacher=(teacher=local "teacher.source=$R/vae16/export/original.safetensors")
  eval_on no_attn_before "$R/vae16_no_attn_untrained.safetensors" kodak24 "${teacher[@]}"
  eval_on no_attn_after "$R/no_attn/export/original.safetensors" kodak24 "${teacher[@]}"
}

# recipe 4 real run (issue 12 section 1): a small trained SD-layout KL model (4 ch, widths 32-64, attention), inflated
# so it overflows fp16 in its residual streams, attention and block interiors (fp32 output unchanged), fixed exactly by
# `vaetrain fp16-fix`, then finetuned. fp16 checks at 512-2048 px are emulated (this CPU's fp16 convolutions are ~100x
# slower than fp32); 256 px also in real fp16.
FP=$R/fp16_fix
stage_fp16() {
  t fp16_base vaetrain train experiment=vae16_cpu student.latent_channels=4 student.use_quant_conv=true \
    student.scaling_factor=0.18215 loss.lpips=null discriminator=null trainer.max_steps=300 \
    trainer.val_check_interval=300 callbacks.checkpoint.every_n_steps=300 logger=csv run_dir=$R/fp16_base
  mkdir -p $FP $OUT/fp16_fix
  t overflow_teacher python scripts/make_overflow_teacher.py --source $R/fp16_base/export/original.safetensors \
    --out $FP/teacher.safetensors --size 64 --blocks 'decoder.mid.block_*' 'decoder.up.*.block.*' 'encoder.mid.block_*' \
    --target 2e5 --streams 'decoder.stream.*' 'encoder.stream.*' '*.attn_1.v' --stream-target 2e5 \
    --audit-sizes 256 512 1024 2048
  cp $FP/teacher_audit.json $OUT/fp16_fix/teacher_audit.json
  t fp16_rescale vaetrain fp16-fix $FP/teacher.safetensors $FP/rescaled.safetensors size=512 limit=2 \
    "images=$A/images/train/bsds500"
  cp $FP/fp16_fix.json $OUT/fp16_fix/rescale_report.json
  stage_fp16_train
}
stage_fp16_train() {
  t fp16_finetune vaetrain train experiment=fp16_fix_cpu run_dir=$FP/finetune
  cp $FP/finetune/fp16_audit.json $OUT/fp16_fix/finetune_audit.json
}
stage_fp16_eval() {
  t fp16_vs_teacher_emulated python scripts/fp16_vs_teacher.py --teacher $FP/teacher.safetensors \
    --models $FP/rescaled.safetensors $FP/finetune/export/original.safetensors --images "$A/images/eval/kodak24" \
    --sizes 512 1024 2048 --limit 1 --mode emulate --no-teacher --out $OUT/fp16_fix/fp16_vs_teacher_emulated.json
  t fp16_vs_teacher_native python scripts/fp16_vs_teacher.py --teacher $FP/teacher.safetensors \
    --models $FP/rescaled.safetensors $FP/finetune/export/original.safetensors --images "$A/images/eval/kodak24" \
    --sizes 256 --limit 2 --mode native --out $OUT/fp16_fix/fp16_vs_teacher_native.json
}

stage_bench() {  # recipe 5 speed/memory: the trained pair at 512/1024/2048 px, and the real SD widths
  t bench_no_attn python scripts/bench_no_attn.py --with-attn "$R/vae16/export/original.safetensors" \
    --without-attn "$R/no_attn/export/original.safetensors" --sizes 512 1024 2048 --out $OUT/no_attn/bench.json
  # the real SD widths: exact FLOPs at 512/1024/2048 and the midblock section timed at 512/1024 (2048's 65k-token
  # attention at 512 channels would take most of an hour on one shared core)
  t bench_midblock python scripts/bench_midblock.py --sizes 512 1024 --reps 1 --threads 1
  grep -v '^+ ' "$R/bench_midblock.log" >"$OUT/no_attn/bench_midblock_sd_widths.txt"
}

stage_collect() {  # results/results.json + results/results.csv from the summaries above
  python scripts/collect_recipe_results.py --runs $R --results $OUT
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(default cache taesd taesd_eval taesd_curve mlp mlp_eval vae16 vae16_eval noattn noattn_eval fp16 fp16_eval bench collect)
for s in "${stages[@]}"; do "stage_$s"; done
