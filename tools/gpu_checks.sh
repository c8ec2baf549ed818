#!/usr/bin/env bash
# GPU correctness checks for multi-GPU code paths, for one device-tool call on a machine with >= 2 GPUs:
#   bash tools/gpu_checks.sh            (carry .whl: the image lacks grain; see /work/.library/device/README.md)
# Prints one line per check; exits non-zero if a check failed. ~3-5 minutes on 2 x H200.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
rc=0
nvidia-smi -L
echo "== Mosaic grouped matmul vs lax.ragged_dot (empty / padded groups)"
timeout 120 python3 tools/check_gmm_groups.py 2>&1 | grep -v "^I1\|^W1" || rc=1
echo "== cuDNN attention, batch split over 2 GPUs (no mask / packed-document mask)"
timeout 120 python3 tools/check_cudnn_mesh.py 2>&1 | grep -v "^I1\|^W1" || rc=1
echo "== GPU tests (tests/test_parallel.py -m gpu)"
JAX_PLATFORMS=cuda timeout 420 python3 -m pytest -q -s -m gpu tests/test_parallel.py -rs -p no:cacheprovider 2>&1 \
  | grep -E "^(ragged|own_vjp|jax_vjp|emulated|dp|capacity|loss)|passed|failed|Error" || rc=1
exit $rc
