#!/usr/bin/env bash
# The GPU checks of this project, as one script: run it unchanged on a machine with CUDA GPUs.
#
#   bash bench/gpu_run.sh [OUT_DIR]        # from the repository root; ~8 min on one H200
#
# 1. the environment (GPUs, torch, NCCL);
# 2. bench/ddp_bench.py on NCCL (2+ GPUs): the trainer's bucketed gradient average against DDP,
#    bf16-mixed, and its share of an on-policy step;
# 3. bench/gpu_job.py: a 2-rank NCCL job (1 rank on a single GPU), teacher served over gRPC on
#    cuda:0 in bf16 and made confident, student in fp32 / bf16-mixed / bf16-true;
# 4. the CPU tests that stand in for these GPU paths, run here too (cuda-only process group,
#    autocast, the confident-teacher tail, precision), with this machine's torch;
# 5. bench/engine_bench.py: the vLLM engine vs ours on a ~1B model (when vllm is installed).
# Results go to OUT_DIR (default bench/gpu-results): one log and JSON per step. Record the
# tables in docs/benchmarks.md.
#
# Python packages: the project's own (pip install -e .). On a machine where pip cannot reach an
# index, carry wheels in ./.whl (see docs/benchmarks.md); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
status=0
run() {  # name, command...: log to OUT/name.log, keep going on failure, remember it
  local name=$1; shift
  echo "== $name: $*"
  if ! timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | tee "$OUT/$name.log"; then status=1; echo "!! $name failed"; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version())" | tee -a "$OUT/env.log"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  run ddp_bench $PY bench/ddp_bench.py --device cuda --backend nccl --precision bf16-mixed \
      --hidden 2048 --layers 8 --batch 8 --seq 512 --steps 12 --repeats 3 --out "$OUT/ddp_bench.json"
else
  echo "== ddp_bench: skipped (NCCL needs a GPU per rank; $GPUS here)"
fi
run gpu_job $PY bench/gpu_job.py --steps 40 --out "$OUT/gpu_job.json"
# 5. the teacher's engines on a ~1B random-weight Llama in bf16: vLLM vs transformers vs
#    in-process, Score and Generate at 8 / 32 / 128 clients, and vLLM offline (needs `vllm`).
if $PY -c "import vllm" 2>/dev/null; then
  STEP_TIMEOUT=${ENGINE_TIMEOUT:-900} run engine_bench $PY bench/engine_bench.py --device cuda \
      --dtype bfloat16 --hidden 2048 --layers 16 --heads 16 --seq-len 512 --requests 256 \
      --gen-requests 128 --new-tokens 128 --clients 8 32 128 --repeats 3
else
  echo "== engine_bench: skipped (pip install vllm)"
fi
run cpu_tests $PY -m pytest -q -p no:cacheprovider tests/student_worker/test_precision.py \
    tests/student_worker/test_sparse_tail.py tests/student_worker/test_fsdp.py
exit $status
