# A ready device call (session 11 plan): validates the m-grouped FP8 GEMM on the GPU, times the expert paths,
# then the train step in BF16 and the FP8 variants, each measured alone (one process after the other).
#   run: setsid nohup bash tools/device/fp8_experts_and_steps.sh > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 540          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
JAX_PLATFORMS=cuda,cpu python3 -m pytest -q -m gpu tests/test_fp8.py -k "grouped or mosaic_gpu_kernel_on_gpu" \
    > /tmp/gpu_tests.txt 2>&1
python3 -m experiments.bench_fp8_experts --record > /tmp/bench_experts.txt 2>&1
cp docs/benchmarks.md /tmp/benchmarks_after_experts.md
P=model.fp8_bf16_projections=kv_a_proj_with_mqa,kv_b_proj
python3 -m experiments.bench_train --steps=10 --variant= --variant=model.fp8=true --variant=model.fp8=true,$P \
    --variant=model.fp8=true,$P,model.fp8_grouped_gemm=fp8 --record > /tmp/bench_train.txt 2>&1
touch /tmp/done
