#!/usr/bin/env bash
# Which GAN settings to try first in the TAESD recipe's CPU run (results/gan_proxy/README.md): the taesd_taef2 recipe
# shortened to 300 steps, the discriminator's verdict on from step 150 (the first try's collapse point), validation
# every 50 steps on 8 Kodak images at 128 px. One variant after the other (never two heavy jobs at once):
#   scripts/gan_proxy.sh                 # all variants
#   scripts/gan_proxy.sh s2_seraena      # some of them
# Run folders go to runs/gan_proxy/ (not committed); the validation curves to results/gan_proxy/curves.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
R=runs/gan_proxy
OUT=results/gan_proxy
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$R" "$OUT"
COMMON=(experiment=taesd_taef2 trainer.max_steps=300 trainer.val_check_interval=50 data.val_count=8 logger=csv
        callbacks.checkpoint.every_n_steps=1000 "export=[]" discriminator.start_step=150)
declare -A VARIANT=(
  [s0_plain]="discriminator.weight=1.0"
  [s1_stab]="discriminator.weight=1.0 discriminator.ramp_steps=100 discriminator.r1_weight=10 discriminator.r1_every=4 discriminator.discriminator.spectral_norm=true"
  # taesd_decoder sets loss=hinge after the group's own lsgan: set it again
  [s2_seraena]="discriminator=seraena discriminator.weight=0.1 discriminator.loss=lsgan discriminator.replay_size=1024"
  [s3_plain01]="discriminator.weight=0.1"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(s0_plain s1_stab s2_seraena s3_plain01)
for name in "${names[@]}"; do
  # shellcheck disable=SC2086
  vaetrain train "${COMMON[@]}" ${VARIANT[$name]} run_dir=$R/$name >"$R/$name.log" 2>&1
  tail -n 1 "$R/$name.log"
done
python - "$R" "$OUT/curves.csv" <<'PY'
import csv, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for log in sorted(runs.glob("*/logs/metrics.csv")):
    for r in csv.DictReader(open(log)):
        if r.get("val/psnr_teacher"):
            rows.append({"variant": log.parts[-3], "step": r["step"], "psnr_teacher": f"{float(r['val/psnr_teacher']):.3f}",
                         "lpips_like_teacher": f"{float(r['val/lpips_teacher']):.3f}"})
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, ["variant", "step", "psnr_teacher", "lpips_like_teacher"])
    w.writeheader()
    w.writerows(rows)
print(f"{out}: {len(rows)} rows")
PY
