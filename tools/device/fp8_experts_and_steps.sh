# Ready device calls (session 11 plan), each under a 10-minute call:
#   part 1: the m-grouped FP8 GEMM on the GPU (gpu tests) and the expert-path micro-benchmark;
#   part 2: train step, BF16 preset vs FP8 with kv_a/kv_b in BF16, default and grouped-FP8 experts (measured alone,
#           one variant after the other, BF16 baseline in the same run).
#   run: setsid nohup bash tools/device/fp8_experts_and_steps.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 540          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  JAX_PLATFORMS=cuda,cpu python3 -m pytest -q -m gpu tests/test_fp8.py -k "grouped or mosaic_gpu_kernel_on_gpu" \
      > /tmp/gpu_tests.txt 2>&1
  python3 -m experiments.bench_fp8_experts --record > /tmp/bench_experts.txt 2>&1
else
  P=model.fp8_bf16_projections=kv_a_proj_with_mqa,kv_b_proj
  python3 -m experiments.bench_train --steps=10 --variant= --variant=model.fp8=true,$P \
      --variant=model.fp8=true,$P,model.fp8_grouped_gemm=fp8 --record > /tmp/bench_train.txt 2>&1
fi
touch /tmp/done
