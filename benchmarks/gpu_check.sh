#!/usr/bin/env bash
# Everything a CUDA machine can show that the CPU cannot, in one run under a deadline:
#   1. the fused SMC loss benchmark (checks Triton against the reference first), eager vs Triton;
#   2. the loader benchmark on real photos (checks the DALI graph against the torch reference first);
#   3. the GPU-marked tests of the kernel and of the DALI backend;
#   4. a short CIFAR-10-LT run through `mixtail train` (bf16, channels_last, Triton loss, torch loader).
#
#     bash benchmarks/gpu_check.sh OUT_DIR PHOTOS_DIR CIFAR10_JPEG_TAR [DEADLINE_S]
#
# Run from the repository root with python3, torch, triton, pytest and nvidia-dali installed (no internet).
# Each step gets what is left of DEADLINE_S (default 480 s), so the run ends in time and keeps what finished.
# Logs and JSON land in OUT_DIR; benchmark JSON is named <bench>_<gpu>_<yyyymmdd>.json.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR PHOTOS_DIR CIFAR10_JPEG_TAR [DEADLINE_S]}
photos=${2:?photos folder}
cifar_tar=${3:?CIFAR-10 JPEG tarball}
deadline=$(( $(date +%s) + ${4:-480} ))
mkdir -p "$out"
out=$(cd "$out" && pwd)
photos=$(cd "$photos" && pwd)
cifar_tar=$(cd "$(dirname "$cifar_tar")" && pwd)/$(basename "$cifar_tar")
root=$(pwd)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the GPU runs the compiled kernels

left() { echo $(( deadline - $(date +%s) )); }
step() {  # step NAME CAP_S CMD...: run CMD with min(CAP_S, time left), log to OUT/NAME.log
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) < cap ? $(left) : cap ))
  if [ "$t" -lt 10 ]; then echo "== $name: skipped, deadline reached" | tee "$out/$name.log"; return; fi
  echo "== $name (up to ${t}s)"
  timeout "$t" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

# The package imports as mixtail.*: install this checkout editable, or fall back to a symlinked package
# outside the root (the root's own mixtail/ would shadow it).
rundir=$root
if ! python3 -m pip install --no-deps --no-build-isolation -e . -q >"$out/pip.log" 2>&1; then
  echo "editable install failed (see pip.log): importing through symlinks"
  rundir=$(mktemp -d)
  mkdir "$rundir/mixtail"
  for f in "$root"/mixtail/*.py; do ln -s "$f" "$rundir/mixtail/"; done
  for d in pipelines kernels trainer benchmarks configs; do ln -s "$root/$d" "$rundir/mixtail/$d"; done
  export PYTHONPATH="$rundir${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$rundir"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; df -h /dev/shm | tail -1
  python3 -c "import sys, torch, triton, nvidia.dali as d; print(sys.version.split()[0], torch.__version__, \
triton.__version__, d.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/versions.log"

step bench_kernel 200 python3 -m mixtail.benchmarks.bench_kernel --out "$out"
step bench_loader 150 python3 -m mixtail.benchmarks.bench_loader --backend dali torch --device cuda \
  --photos "$photos" --out "$out" --threads "$(nproc)"
step tests_gpu 150 env PHOTOS_DIR="$photos" python3 -m pytest "$root/tests/test_smc_kernel.py" "$root/tests/test_dali_loader.py" -m gpu -q \
  -p no:cacheprovider -rs
data=$(mktemp -d)
tar xzf "$cifar_tar" -C "$data"
# A shortened schedule (40 epochs, decays at 32 and 36) that fits the lease; the recipe is otherwise the
# paper's: ResNet-32, batch 128, lr 0.1, 5 warmup epochs, eta 0.1.
step cifar10_lt_r100_40ep 240 python3 -m mixtail train cifar10_lt_r100 --data.dataset=folder --data.root="$data" \
  --train.epochs=40 --optim.milestones=[32,36] --train.eval_every_epochs=10 --train.out_dir="$out/cifar10_lt_r100_40ep"
echo "done with $(left)s to spare; results in $out"
