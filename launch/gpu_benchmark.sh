#!/usr/bin/env bash
# Every GPU figure in one call (ivt_jax.tools.gpu_benchmark): training throughput of ViT-B at the reference batch
# (stride 12 and 16, float32 and bfloat16, XLA and cuDNN attention), the reference implementation's step beside
# it, model-FLOPs utilization at a filling batch, 10,000 x 1,000,000 top-10 retrieval and the input pipeline.
# Prints markdown tables and writes them with every figure as JSON under --out (default gpu_benchmark_out/).
#
#   bash launch/gpu_benchmark.sh [--reference_repo=DIR] [--out=DIR] [--size=full|tiny] [--budget_s=540]
#
# For a bare GPU machine without network: the packages it lacks come as wheels downloaded beforehand into
# launch/wheels/ (the command is in launch/gpu_wheels.txt); they are installed into a private folder ($IVT_SITE,
# default /tmp/ivt-gpu-site) put first on PYTHONPATH, and nothing else on the machine changes. A package still
# missing stops the run at once, naming it. $PYTHON chooses the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${IVT_WHEELS:-launch/wheels}"
SITE="${IVT_SITE:-/tmp/ivt-gpu-site}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m ivt_jax.tools.gpu_benchmark "$@"
