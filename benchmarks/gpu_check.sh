#!/usr/bin/env bash
# The GPU check, for a session that is lent a device machine: the device tests and the GPU rows of the
# benchmarks in one call of at most 8 minutes, so that the machine's minutes go to measuring.
#
#   here:   .venv/bin/python benchmarks/gpu_pack.py        (writes .gpu/: the embedded model in float16,
#                                                            WikiText-2 validation, the missing wheels)
#   there:  device run, carry [".gpu"], timeout_s 560:  bash benchmarks/gpu_check.sh
#
# Everything it writes goes to $OUT (the device tool brings it back) and, for the benchmarks, to
# benchmarks/results/*cuda*.json there (copied to $OUT). Each step has its own time limit and a failed step
# does not stop the others; the last line says which steps failed. GPU=cpu runs the same steps on the host
# (a dry run of the script itself, at smaller sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
GPU=${GPU:-cuda}
SITE=/tmp/featint_site
PY=${PY:-python3}
mkdir -p "$OUT" "$SITE"
failed=()
if [ "$GPU" != cuda ]; then  # a dry run here: the benchmarks' host results in the tree are put back at the end
  rm -rf "$OUT/results.kept" && cp -a benchmarks/results "$OUT/results.kept"
fi

step() {  # step NAME SECONDS COMMAND...: run one step with its own limit, its output in $OUT/NAME.log
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds} s)"
  local started=$SECONDS
  if timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - started)) s"
  else
    echo "   FAILED (exit $?) after $((SECONDS - started)) s; the end of its log:"
    tail -n 15 "$OUT/$name.log"
    failed+=("$name")
  fi
}

if [ -d .gpu/whl ] && $PY -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))"; then  # the wheels are 3.12's
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/whl/*.whl \
    || failed+=(wheels)
fi
$PY benchmarks/gpu_pack.py --unpack "$SITE" || failed+=(unpack)
export PYTHONPATH="$SITE:$PWD" FEATINT_TENSORBOARD=0 PYTHONUNBUFFERED=1

$PY - <<EOF | tee "$OUT/device.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)
if "$GPU" == "cuda":
    assert torch.cuda.is_available(), "no GPU visible to torch"
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
EOF

if [ "$GPU" = cuda ]; then
  widths=(16384 65536); tokens=2000000; epochs=3; ladder_arm=cuda; ladder_limit=150; members=(1 2 4 8)
else
  widths=(4096); tokens=100000; epochs=1; ladder_arm=single; ladder_limit=600; members=(1 2)
fi
peers=()
$PY -c "import sparsify" 2>/dev/null || peers+=(sparsify)
$PY -c "import sae_lens" 2>/dev/null || peers+=(saelens)

# the tests that take the GPU (a checkpoint resumed on it, the splice on it in float32 and bfloat16)
step tests 90 $PY -m pytest -q -p no:cacheprovider -n 0 tests/test_distributed.py -k "$GPU"
# featint's SAETrainer step vs sparsify (and SAELens if present) at 16k and 64k latents, k=32 and 128
for k in 32 128; do
  step "sae_train_k$k" 90 $PY benchmarks/sae_train.py --device "$GPU" --widths "${widths[@]}" --k "$k" \
    --tokens "$tokens" --lrs 3e-3 --skip "${peers[@]}"
done
# extraction vs a bare forward on the same batches
step extraction 60 $PY benchmarks/extraction.py --device "$GPU" --repeats 2 --throughput-only
# the ladder's members trained together (stacked) vs one by one (the pipeline's trainer), on the GPU
step stacked 45 $PY benchmarks/stacked_members.py --device "$GPU" --members "${members[@]}" --epochs 1
# stage 02's ladder (the pipeline's interaction.run) on the GPU vs every host core
step ladder "$ladder_limit" $PY benchmarks/ladder.py --epochs "$epochs" --arms single_all_cores "$ladder_arm"

cp benchmarks/results/*cuda*.json "$OUT/" 2>/dev/null
if [ "$GPU" != cuda ]; then
  cp benchmarks/results/*.json "$OUT/" && rm -rf benchmarks/results && mv "$OUT/results.kept" benchmarks/results
fi
echo "failed steps: ${failed[*]:-none}" | tee "$OUT/summary.txt"
