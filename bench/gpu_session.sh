#!/usr/bin/env bash
# The one prepared GPU session (issue #29), run by the device tool in the repository root:
#   here first:  bash bench/gpu_prepare_wheels.sh        (wheels the offline machine lacks)
#   then:        run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Steps, each under its own `timeout`, the whole within SESSION_SECONDS (default 540 s);
# a failed step is recorded in steps.tsv and the next one runs:
#   1. environment: nvidia-smi, python, torch.cuda, compiler            -> session.log
#   2. install as a user would: a fresh venv seeing the image's packages (torch for CUDA),
#      pip install -e ".[dev,gpu]" from the carried wheels only; the gpu extra (faiss-gpu)
#      cannot be carried (see gpu_prepare_wheels.sh), so on failure ".[dev]"   -> install.log
#   3. pytest -q -m cuda (tests/test_cuda.py and any other cuda-marked test) -> cuda_tests.log
#   4. the full suite with CUDA visible, 8 workers x 2 threads, time-limited  -> full_suite.log
#   5. bench/bench_gpu.py: WideResNet50 (random weights), IM224, 10 %, 200 images
#                                                        -> bench.log, bench.json
# Files come back from $OUT (at most 8): session.log, steps.tsv, install.log, cuda_tests.log,
# full_suite.log, bench.log, bench.json.
set -u
START=$(date +%s)
SESSION_SECONDS=${SESSION_SECONDS:-540}
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATCHCORE_CACHE_DIR=/tmp/patchcore-cache
exec > >(tee -a "$OUT/session.log") 2>&1
printf 'step\texit\tseconds\tlimit\n' > "$OUT/steps.tsv"

# run_step NAME LIMIT LOG COMMAND...: COMMAND under `timeout` (LIMIT, or what is left of the
# session minus 10 s, whichever is smaller), its output also to LOG (- for none).
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((SESSION_SECONDS - ($(date +%s) - START) - 10))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        echo "=== $name: skipped, no time left"
        printf '%s\tskipped\t0\t0\n' "$name" >> "$OUT/steps.tsv"
        return
    fi
    [[ $log == - ]] && log=/dev/null
    echo "=== $name (limit ${limit}s): $*"
    local began
    began=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
    local code=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$(($(date +%s) - began))" "$limit" >> "$OUT/steps.tsv"
    echo "=== $name: exit $code after $(($(date +%s) - began)) s"
}

# 1. environment
environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nvidia-smi -L
    python3 -V; command -v python3; nproc; free -g | head -2
    (cc --version || gcc --version) 2>&1 | head -1
    python3 - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.device_count(), "device(s):", p.name, f"{p.total_memory / 2**30:.1f} GiB",
          p.multi_processor_count, "SMs", "capability", torch.cuda.get_device_capability(0))
    print("cudnn", torch.backends.cudnn.version(), "allow_tf32 cudnn",
          torch.backends.cudnn.allow_tf32, "matmul", torch.backends.cuda.matmul.allow_tf32)
EOF
    ls -la .whl 2>&1 | head -12
}
export -f environment
run_step environment 30 - bash -c environment

# 2. install: a fresh venv whose site-packages also reads the image's (torch, numpy, ...)
install() {
    local image_site
    image_site=$(python3 -c 'import site; print("\n".join(site.getsitepackages()))')
    rm -rf /tmp/venv
    if python3 -m venv /tmp/venv; then
        local venv_site
        venv_site=$(/tmp/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$image_site" > "$venv_site/image_packages.pth"
        PY=/tmp/venv/bin/python
    else
        echo "python3 -m venv failed (no ensurepip?): installing into the image's python3"
        PY=python3
    fi
    local pip=("$PY" -m pip install --no-index --find-links .whl --no-cache-dir)
    if ! "${pip[@]}" -e ".[dev,gpu]"; then
        echo "INSTALL NOTE: .[dev,gpu] cannot be installed offline here (no faiss-gpu wheel" \
             "carried: 135 MB plus CUDA 12 cuBLAS; this image is CUDA 13); installing .[dev]"
        "${pip[@]}" -e ".[dev]" || return 1
    fi
    "$PY" -m pip check | tail -5
    "$PY" - <<'EOF'
import faiss, patchcore, torch
from patchcore.model.native import coreset_kernels
from patchcore.model.search import faiss_gpu_problem
print("patchcore", patchcore.__file__, "faiss", faiss.__version__,
      "faiss on GPU:", faiss_gpu_problem() or "yes", "compiled kernels:", coreset_kernels() is not None)
EOF
}
export -f install
run_step install 120 "$OUT/install.log" bash -c install
# `install` ran in a pipeline's subshell: find the interpreter it set up again
[[ -x /tmp/venv/bin/python ]] && /tmp/venv/bin/python -c "import patchcore" 2>/dev/null && PY=/tmp/venv/bin/python
[[ ${PY:-} ]] || PY=python3
echo "python for the tests: $PY"
# pytest-xdist and pytest-timeout are in the GPU image; used where present
parallel=() limits=()
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && limits=(--timeout 180)

# 3. the CUDA tests
run_step cuda_tests 120 "$OUT/cuda_tests.log" \
    "$PY" -m pytest -q -m cuda -rs "${limits[@]}" -p no:cacheprovider tests/
# 4. the full suite with CUDA visible (FULL_SUITE narrows it, e.g. for a dry run)
# shellcheck disable=SC2086
run_step full_suite 240 "$OUT/full_suite.log" env OMP_NUM_THREADS=2 \
    "$PY" -m pytest -q --maxfail 20 "${parallel[@]}" "${limits[@]}" -p no:cacheprovider \
    ${FULL_SUITE:-tests/}
# 5. the benchmark (BENCH_ARGS adds options, e.g. --smoke --device cpu for a dry run)
# shellcheck disable=SC2086
run_step bench 170 "$OUT/bench.log" "$PY" bench/bench_gpu.py --json "$OUT/bench.json" \
    ${BENCH_ARGS:-}

echo "=== summary ($(($(date +%s) - START)) s)"
column -t "$OUT/steps.tsv"
grep -E "passed|failed|error" "$OUT/cuda_tests.log" "$OUT/full_suite.log" 2>/dev/null | tail -4
