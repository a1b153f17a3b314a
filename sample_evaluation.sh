#!/usr/bin/env bash
# Evaluate saved PatchCore models on the 15 MVTec AD categories.
#
#   bash sample_evaluation.sh MVTEC_PATH MODEL_RUN_PATH [RESULTS_PATH]
#
# MODEL_RUN_PATH is a run folder written with --save_patchcore_model, e.g.
# results/MVTecAD_Results/IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1; its models/mvtec_<category>/
# folders are loaded (ensemble members are found inside). Preprocessing comes from the saved
# models. Results go to RESULTS_PATH (default: results/evaluated/<run name>).
# CATEGORIES="bottle cable" (spaces or commas) picks the categories (default: all 15).
# Set GPU=-1 to force the CPU. Runs with $PYTHON (default python3), which must have patchcore
# installed: activate its virtual environment first, or set e.g. PYTHON=.venv/bin/python.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0"
  exit 2
fi
datapath=$1
run_path=${2%/}
results=${3:-results/evaluated/$(basename "$run_path")}
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
model_flags=()
dataset_flags=()
for category in "${categories[@]}"; do
  model_flags+=(-p "$run_path/models/mvtec_$category")
  dataset_flags+=(-d "$category")
done

"$python" "$here/bin/load_and_evaluate_patchcore.py" --gpu "$gpu" --seed 0 "$results" \
  patch_core_loader "${model_flags[@]}" \
  dataset "${dataset_flags[@]}" mvtec "$datapath"
