#!/usr/bin/env bash
# Issue 8's GPU targets in one call under a deadline, each step with its own time cap (seconds):
#   tests_gpu       100  python -m pytest tests -m gpu (kernels, graphed vs eager steps, bench step's check)
#   step_r32         90  mixtail bench step, ResNet-32 at 32 px, 128 pairs x 2 views: eager and CUDA graphs
#                        (target: graphs >= 25k images/s)
#   step_r32_compile 90  the same, torch.compile (eager again as the reference of the one-step check)
#   train_classic    90  mixtail bench train on the CIFAR-10 JPEG tree: torch loader + step, its fraction of the
#                        step alone, and --baseline classic with 4 and 16 workers
#   train_200ep     240  mixtail train configs/cifar10_lt_r100.yaml on the tree, 200 epochs, evaluation included
#                        (targets: <= 180 s wall from launch to the final table; per epoch >= 3x the classic loop)
#   step_r50         75  mixtail bench step, ResNet-50 at 224 px, eager and CUDA graphs
#   train_r50_dali   90  mixtail bench train, ResNet-50 at 224 px on real photos, DALI loader + step against the
#                        step alone (target: of_step >= 0.9); needs PHOTOS (below) and DALI, else skipped
#   bench_kernel     60  mixtail bench loss (the fused SMC loss against the eager reference)
# then gpu_check_<gpu>_<yyyymmdd>.json (every step's exit status, wall time and cap, and the targets, PASS or
# FAIL) and gpu_check_results.tar.gz (all logs and JSON, no checkpoints: one file to bring back).
#
#     bash benchmarks/gpu_check.sh OUT_DIR CIFAR10_JPEG_TAR [DEADLINE_S]
#     PHOTOS=.gpu-data/photos bash benchmarks/gpu_check.sh ...      # with the ResNet-50 DALI row
#     TINY=1 bash benchmarks/gpu_check.sh OUT_DIR TINY_JPEG_TAR 300     # the CPU test (tests/test_bench_step.py)
#
# Run from the repository root with python3, torch, torchvision, triton, pytest, pyyaml, tqdm and matplotlib
# (no internet; DALI and FFCV are used where installed and skipped otherwise). Each step gets min(cap, time
# left of DEADLINE_S, default 540 s); a step that runs out is killed and the ones that finished keep their
# logs and JSON in OUT_DIR. TINY=1 shrinks every step (ResNet-8, batches of 8, 2 epochs of 2 steps) and skips
# the GPU tests, so the whole script runs on a CPU in a few minutes.
# PHOTOS: a folder of JPEG photos (../shared/data/photos: 334 ImageNet photos, 35 MB), dealt round-robin into 8
# class folders for the ResNet-50 row (all of them: data.imbalance_ratio=1, a throughput row). The GPU machine has no DALI: ../shared/gpu/stage-dali-wheels.sh stages it
# in 5 folders carried in back-to-back calls; run this script in the call that runs .dali-w5/install-dali.sh.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR CIFAR10_JPEG_TAR [DEADLINE_S]}
cifar_tar=${2:?CIFAR-10 JPEG tarball (../shared/data/cifar10/cifar10-jpeg.tar.gz)}
deadline=$(( $(date +%s) + ${3:-540} ))
tiny=${TINY:-0}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cifar_tar=$(cd "$(dirname "$cifar_tar")" && pwd)/$(basename "$cifar_tar")
root=$(pwd)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # a GPU runs the compiled kernels; bench_kernel sets it itself on a CPU

left() { echo $(( deadline - $(date +%s) )); }
: >"$out/steps.tsv"
skipped() {  # skipped NAME CAP_S REASON: a step that cannot run here, recorded with its reason
  echo "== $1: skipped, $3" | tee "$out/$1.log"
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$out/steps.tsv"
}
step() {  # step NAME CAP_S CMD...: run CMD for at most min(CAP_S, time left), log to OUT/NAME.log
  local name=$1 cap=$2; shift 2
  local t; t=$(( $(left) < cap ? $(left) : cap ))
  if [ "$t" -lt 10 ]; then
    skipped "$name" "$cap" "deadline reached"
    return
  fi
  echo "== $name (up to ${t}s)"
  local start; start=$(date +%s)
  timeout -k 10 "$t" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc after $(( $(date +%s) - start ))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$t" >>"$out/steps.tsv"
}

photos_tree() {  # photos_tree SRC DST K: SRC's JPEGs (any depth) linked round-robin into DST/{train,test}/cK
  local i=0 f
  while IFS= read -r f; do
    for split in train test; do
      mkdir -p "$2/$split/c$(( i % $3 ))"
      ln -s "$f" "$2/$split/c$(( i % $3 ))/$(basename "$f")"
    done
    i=$(( i + 1 ))
  done < <(find "$(cd "$1" && pwd)" -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) | sort)
  echo "photos: $i files from $1 in $3 classes"
}

source "$root/benchmarks/import_checkout.sh"  # python3 imports mixtail from this checkout
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  echo "cpus $(nproc)"
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; } 2>&1 | tee "$out/versions.log"

data=$(mktemp -d)
t0=$(date +%s)
tar xzf "$cifar_tar" -C "$data"
echo "extracted $cifar_tar in $(( $(date +%s) - t0 ))s"
tree=(--data.dataset=folder "--data.root=$data")

if [ "$tiny" = 1 ]; then
  small=(--model.arch=resnet8 --data.batch_size=8)
  timing=(--warmup 0 --windows 2 --window-steps 1)
  r50=(--data.batch_size=2 --data.image_size=64)
  run_len=(--train.epochs=2 --train.max_steps_per_epoch=2 --data.eval_batch_size=200)
  workers=(0 2)
  kernel=(--sizes 64 --dtypes fp32 --budget-s 0.1)
  echo "== tests_gpu: skipped (TINY=1)"
else
  small=(); timing=(); run_len=(); workers=(4 16); kernel=(--budget-s 0.5)
  r50=(--windows 5 --window-steps 10)  # about 65 ms a step eager (../shared/ENV.md, H100): 60 steps a mode
  step tests_gpu 100 python3 -m pytest "$root/tests" -m gpu -q -p no:cacheprovider -rs
fi

step step_r32 90 python3 -m mixtail bench step --config cifar10_lt_r100 --modes eager graphs "${small[@]}" \
  "${timing[@]}" --out "$out/step_r32"
step step_r32_compile 90 python3 -m mixtail bench step --config cifar10_lt_r100 --modes compile "${small[@]}" \
  "${timing[@]}" --out "$out/step_r32_compile"
step train_classic 90 python3 -m mixtail bench train --config cifar10_lt_r100 "${tree[@]}" --backend torch dali ffcv \
  --baseline classic --workers "${workers[@]}" "${small[@]}" "${timing[@]}" --out "$out/train_classic"
# The paper's full schedule (200 epochs, evaluation every 10); wall time from launch to exit.
step train_200ep 240 python3 -m mixtail train cifar10_lt_r100 "${tree[@]}" "${small[@]}" "${run_len[@]}" \
  "--train.out_dir=$out/train_200ep" --overwrite
step step_r50 75 python3 -m mixtail bench step --config imagenet_lt_rn50 --modes eager graphs "${r50[@]}" \
  "${timing[@]}" --out "$out/step_r50"
if [ -z "${PHOTOS:-}" ]; then
  skipped train_r50_dali 90 "PHOTOS is not set"
elif ! python3 -c "import nvidia.dali" 2>/dev/null; then
  skipped train_r50_dali 90 "NVIDIA DALI is not installed (../shared/gpu/stage-dali-wheels.sh)"
else
  photos_tree "$PHOTOS" "$data/photos" 8
  step train_r50_dali 90 python3 -m mixtail bench train --config imagenet_lt_rn50 --data.dataset=folder \
    "--data.root=$data/photos" --data.imbalance_ratio=1 --backend dali "${r50[@]}" "${timing[@]}" --out "$out/train_r50_dali"
fi
step bench_kernel 60 python3 -m mixtail bench loss "${kernel[@]}" --out "$out/kernel"
rm -rf "$data"

python3 - "$out" <<'EOF'
"""The summary: every step's status, and issue 8's targets read off the JSON and the run directory."""
import json, sys
from pathlib import Path
from mixtail.benchmarks.common import environment, format_table, write_json

out = Path(sys.argv[1])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, wall, cap = line.split("\t")
    steps[name] = {"step": name, "exit": rc, "wall_s": int(wall), "cap_s": int(cap)}

def rows_of(folder):
    files = sorted((out / folder).glob("*.json"))
    return json.loads(files[-1].read_text())["rows"] if files else []

targets = {}
graphs = [r for r in rows_of("step_r32") if r["mode"] == "graphs"]
if graphs:
    rate = graphs[0]["images_per_s"]
    targets["r32_graphs_images_per_s"] = {"value": rate, "target": ">= 25000", "pass": rate >= 25000}
train_rows = rows_of("train_classic")
classic = [r["epoch_s"] for r in train_rows if r["backend"] == "classic"]
torch_row = next((r for r in train_rows if r["backend"] == "torch"), None)
if torch_row:
    targets["torch_loader_of_step"] = {"value": torch_row["of_step"], "target": "1.0 = loader hidden", "pass": None}
dali_row = next((r for r in rows_of("train_r50_dali") if r["backend"] == "dali"), None)
if dali_row:
    targets["r50_dali_of_step"] = {"value": dali_row["of_step"], "target": ">= 0.9", "pass": dali_row["of_step"] >= 0.9}
run = out / "train_200ep"
epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
epochs = [e for e in epochs if "loss" in e]
if epochs and "train_200ep" in steps:
    wall, done = steps["train_200ep"]["wall_s"], len(epochs)
    finished = (run / "final_eval.json").exists()
    targets["train_200ep_wall_s"] = {"value": wall, "epochs_done": done, "finished": finished, "target": "<= 180",
                                     "pass": finished and done == 200 and wall <= 180}
    if classic:
        per_epoch = wall / done  # launch to exit over the epochs run: start-up and evaluation included
        train_only = sorted(e["train_time_s"] for e in epochs)[len(epochs) // 2]
        targets["epoch_speedup_vs_classic"] = {
            "value": min(classic) / per_epoch, "train_only": min(classic) / train_only, "classic_epoch_s": min(classic),
            "our_wall_per_epoch_s": per_epoch, "our_train_epoch_s": train_only, "target": ">= 3", "pass": min(classic) / per_epoch >= 3}
    if finished:
        targets["train_200ep_top1"] = {"value": json.loads((run / "final_eval.json").read_text()).get("all"),
                                       "target": "accuracy issue 7", "pass": None}
print(format_table(list(steps.values())))
for name, t in targets.items():
    verdict = {True: "PASS", False: "FAIL", None: "info"}[t["pass"]]
    value = f"{t['value']:.4g}" if isinstance(t["value"], (int, float)) else str(t["value"])
    print(f"{name}: {value} (target {t['target']}) {verdict}")
path = write_json("gpu_check", list(steps.values()), config={"targets": targets}, env=environment({}), out_dir=str(out))
print(f"wrote {path}")
EOF
tar czf "$out/gpu_check_results.tar.gz" -C "$out" --exclude='*.pt' --exclude=gpu_check_results.tar.gz \
  $(cd "$out" && ls | grep -v '^gpu_check_results.tar.gz$')
echo "done with $(left)s to spare; results in $out (all of it in gpu_check_results.tar.gz)"
