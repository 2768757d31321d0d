#!/usr/bin/env bash
# The GPU figures of issues 3 and 4, in stages that each fit the device tool's 10-minute command limit.
#
# Once, on the development machine (the wheels and CIFAR-10 travel in the ignored .whl/ folder):
#   mkdir -p .whl && cp ../shared/wheels-py312/*.whl ../shared/data/cifar10-jpg.tar.gz .whl/ && echo /.whl/ >> .git/info/exclude
# Then one device `run` per stage (carry [".whl"]), results under $OUT (default: ./gpu-results):
#   bash benchmarks/gpu_runbook.sh setup gpu-tests augment     # ~3 min
#   bash benchmarks/gpu_runbook.sh r18                          # ResNet-18 CIFAR, batch 512, 3 variants
#   bash benchmarks/gpu_runbook.sh r50                          # ResNet-50 224 px, batch 256, 3 variants
#   bash benchmarks/gpu_runbook.sh profile                      # torch.profiler of ours, bf16 + channels_last
#   bash benchmarks/gpu_runbook.sh cifar200                     # repeat until it prints "cifar200: done"
#   bash benchmarks/gpu_runbook.sh probe                        # linear probe of the 200-epoch backbone
# Every stage begins with `setup` when /tmp/site is missing (a fresh machine), so stages can also run alone.
# cifar200 trains in /tmp/cifar200, outside $OUT, and resumes there: consecutive calls must reach the same warm
# machine (nothing outside $OUT survives its return); each call stops itself after CHUNK_S seconds (SIGTERM:
# byol-train saves and exits 143) and copies the log and plot to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
CHUNK_S=${CHUNK_S:-500}
export PYTHONUNBUFFERED=1

setup() {
  if [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
  fi
  export PYTHONPATH=/tmp/site:$PWD
  if [ ! -d /tmp/cifar10/train ]; then
    mkdir -p /tmp/cifar10 && tar -xzf .whl/cifar10-jpg.tar.gz -C /tmp/cifar10 || return 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, torchvision, kornia; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'kornia', kornia.__version__)" | tee -a "$OUT/gpu.txt"
}

throughput() {  # NAME ARGS...
  local name=$1
  shift
  python3 benchmarks/throughput.py "$@" 2>&1 | tee "$OUT/$name.md"
}

for stage in "$@"; do
  [ -d /tmp/site ] && [ -d /tmp/cifar10/train ] && export PYTHONPATH=/tmp/site:$PWD || setup || exit 1
  echo "== $stage ($(date -u +%FT%TZ))"
  case "$stage" in
    setup) ;;
    gpu-tests)
      python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.txt" ;;
    augment)
      throughput augment-224 --configs ours_augment,lightly_loader --image-size 224 --batch-size 256 --no-cifar-stem \
        --backbone resnet50 --workers 16 --steps 50 ;;
    r18)
      throughput r18-fp32 --backbone resnet18 --image-size 32 --batch-size 512 --cifar-stem --workers 16
      throughput r18-bf16-cl --backbone resnet18 --image-size 32 --batch-size 512 --cifar-stem --workers 16 \
        --precision bf16 --channels-last
      throughput r18-bf16-cl-compile --backbone resnet18 --image-size 32 --batch-size 512 --cifar-stem --workers 16 \
        --precision bf16 --channels-last --compile --configs floor,ours,byol_pytorch ;;
    r50)
      throughput r50-fp32 --backbone resnet50 --image-size 224 --batch-size 256 --no-cifar-stem --workers 16 --steps 10
      throughput r50-bf16-cl --backbone resnet50 --image-size 224 --batch-size 256 --no-cifar-stem --workers 16 --steps 10 \
        --precision bf16 --channels-last
      throughput r50-bf16-cl-compile --backbone resnet50 --image-size 224 --batch-size 256 --no-cifar-stem --workers 16 \
        --steps 10 --precision bf16 --channels-last --compile --configs floor,ours ;;
    profile)
      throughput r50-profile --backbone resnet50 --image-size 224 --batch-size 256 --no-cifar-stem --precision bf16 \
        --channels-last --profile --profile-config ours ;;
    cifar200)
      # examples/cifar10.py's recipe (LARS 1.0 x batch/256, wd 1e-5, eta 0.02, tau 0.99, no blur at 32 px), resumable
      timeout --preserve-status -s TERM "$CHUNK_S" python3 -m byol_wrapper.train \
        --data /tmp/cifar10/train --eval-data /tmp/cifar10 --out /tmp/cifar200 --backbone resnet18 --cifar-stem \
        --hidden-layer avgpool --image-size 32 --batch-size 512 --epochs 200 --optimizer lars --lr 2.0 \
        --weight-decay 1e-5 --trust-coefficient 0.02 --moving-average-decay 0.99 --augment-kwargs '{"blur_p": 0.0}' \
        --warmup-epochs 10 --precision bf16 --channels-last --workers 16 --eval-every 20 --checkpoint-every 200 \
        --no-progress 2>&1 | tail -n 40 | tee -a "$OUT/cifar200.txt"
      rc=${PIPESTATUS[0]}
      cp /tmp/cifar200/metrics.jsonl /tmp/cifar200/metrics.png /tmp/cifar200/config.json "$OUT/" 2>/dev/null
      if [ "$rc" -eq 0 ]; then echo "cifar200: done"; else echo "cifar200: stopped with status $rc; run the stage again"; fi ;;
    probe)
      python3 examples/finetune.py --mode linear --backbone /tmp/cifar200/backbone.pt --data /tmp/cifar10 \
        --workers 16 --out "$OUT/probe" 2>&1 | tee "$OUT/probe.txt" ;;
    *)
      echo "unknown stage $stage (setup gpu-tests augment r18 r50 profile cifar200 probe)" >&2
      exit 2 ;;
  esac
done
