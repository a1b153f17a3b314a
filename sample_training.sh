#!/usr/bin/env bash
# Train and evaluate the paper's PatchCore configurations on the 15 MVTec AD categories.
#
#   bash sample_training.sh MVTEC_PATH [RESULTS_PATH] [CONFIG ...]
#
# MVTEC_PATH holds the category folders (bottle/, cable/, ...). Each configuration's run
# goes to RESULTS_PATH/MVTecAD_Results/<name>/ with results.csv and models/mvtec_<category>/.
# CONFIG picks configurations by name (default: all), e.g. IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1.
# CATEGORIES="bottle cable" (spaces or commas) picks the category folders (default: all 15),
# so any MVTec-layout folder works. Set GPU=-1 to force the CPU (default GPU=0, which falls
# back to the CPU without CUDA).
# Runs with $PYTHON (default python3), which must have patchcore installed: activate its
# virtual environment first, or set e.g. PYTHON=.venv/bin/python.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,13p' "$0"
  exit 2
fi
datapath=$1
results=${2:-results}
shift $(( $# >= 2 ? 2 : 1 ))
selected=("$@")
gpu=${GPU:-0}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
if ! "$python" -c "import patchcore" 2>/dev/null; then
  echo "error: '$python' cannot import patchcore; activate the virtual environment where it" \
       "is installed or set PYTHON=/path/to/venv/bin/python" >&2
  exit 2
fi

if [ -n "${CATEGORIES:-}" ]; then
  read -r -a categories <<< "${CATEGORIES//,/ }"
else
  categories=(bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper)
fi
dataset_flags=()
for category in "${categories[@]}"; do dataset_flags+=(-d "$category"); done

wr50=(-b wideresnet50 -le layer2 -le layer3)
ensemble=(-b wideresnet101 -b resnext101 -b densenet201
          -le 0.layer2 -le 0.layer3 -le 1.layer2 -le 1.layer3
          -le 2.features.denseblock2 -le 2.features.denseblock3)
im224=(--resize 256 --imagesize 224)
im320=(--resize 366 --imagesize 320)

# name | backbone flags | dims | patch size | coreset fraction | image size
run() {
  local name=$1 backbone=$2 target_dim=$3 patchsize=$4 percentage=$5 size=$6
  if [ ${#selected[@]} -gt 0 ] && [[ ! " ${selected[*]} " == *" $name "* ]]; then return; fi
  local -n backbone_flags=$backbone
  local -n size_flags=$size
  echo "=== $name"
  "$python" "$here/bin/run_patchcore.py" --gpu "$gpu" --seed 0 --save_patchcore_model \
    --log_group "$name" --log_project MVTecAD_Results "$results" \
    patch_core "${backbone_flags[@]}" --pretrain_embed_dimension 1024 \
      --target_embed_dimension "$target_dim" --anomaly_scorer_num_nn 1 --patchsize "$patchsize" \
    sampler -p "$percentage" approx_greedy_coreset \
    dataset "${size_flags[@]}" "${dataset_flags[@]}" mvtec "$datapath"
}

run IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1 wr50 1024 3 0.1 im224
run IM224_WR50_L2-3_P001_D1024-1024_PS-3_AN-1 wr50 1024 3 0.01 im224
run IM224_Ensemble_L2-3_P001_D1024-384_PS-3_AN-1 ensemble 384 3 0.01 im224
run IM320_WR50_L2-3_P001_D1024-1024_PS-3_AN-1 wr50 1024 3 0.01 im320
run IM320_Ensemble_L2-3_P001_D1024-384_PS-3_AN-1 ensemble 384 3 0.01 im320
run IM224_WR50_L2-3_P01_D1024-1024_PS-5_AN-1 wr50 1024 5 0.1 im224
run IM320_WR50_L2-3_P001_D1024-1024_PS-5_AN-1 wr50 1024 5 0.01 im320
