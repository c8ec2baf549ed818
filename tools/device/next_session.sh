# Ready device calls (next session), each under a 10-minute call:
#   part 1 (one GPU, the issue's H100: --kind nvidia-h100-x1): the GPU tests of session 19's last two kernel
#           changes, never run on a GPU (the weight-only FP8 kernel's shared-x form; the selection kernel's combine
#           weights, moe_topk_weights), the selection table with its new weights columns, then a batch-32
#           FP8-weights decode profile of session 19's library (what is left after its changes).
#   part 2 (nvidia-h200-x2 or h100-x2: two GPUs): generation on a mesh against one device in one process
#           (bench_decode --mesh; session 15's sharded generation is tested for equality on 2 H200s but not timed):
#           data=2 (each GPU decodes half the rows) and expert=2 (the all-to-all per decode step).
#   part 3 (one GPU): the MLA decode-kernel sweep with V3's batch-32 row (cut off by the 150 s / 200 s limits of
#           sessions 15 and 16), then the weight-only FP8 kernel's table again (session 16 recorded it once).
#   part 4 (one GPU): MTP self-speculative decoding on `small` trained 400 steps, one and three drafts per forward,
#           greedy (last GPU run: session 15 on an H200, 1.44x / 1.50x at batch 1; since then the routing kernel, the
#           shared-expert fold, the in-place cache changed both the plain and the speculative steps).
#   run: setsid nohup bash tools/device/next_session.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 560          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -m gpu tests/test_fp8_weight_gemm.py tests/test_moe_topk.py \
      -p no:warnings -rs > /tmp/gputest.txt 2>&1
  timeout 150 python3 -m experiments.bench_moe_topk --record > /tmp/topk.txt 2>&1
  timeout 200 python3 -m experiments.bench_decode --batch_sizes=32 --repeats=1 --fp8_weights --profile \
      --profile_top=45 --stop_s=190 > /tmp/prof32.txt 2>&1
elif [ "$1" = 4 ]; then
  timeout 400 python3 -m experiments.bench_mtp --config=small --steps=400 --draft_tokens=1,3 --temperatures=0 \
      --record > /tmp/mtp.txt 2>&1
elif [ "$1" = 3 ]; then
  timeout 330 python3 -m experiments.bench_mla_decode --record > /tmp/mla_bench.txt 2>&1
  cp docs/benchmarks.md /tmp/bm_after_mla.md.txt
  timeout 200 python3 -m experiments.bench_fp8_weight_gemm --record > /tmp/fp8w_bench.txt 2>&1
else
  timeout 260 python3 -m experiments.bench_decode --batch_sizes=32,128 --mesh=data=2 --repeats=2 \
      > /tmp/mesh_data.txt 2>&1
  timeout 260 python3 -m experiments.bench_decode --batch_sizes=32,128 --mesh=expert=2 --repeats=2 \
      > /tmp/mesh_expert.txt 2>&1
fi
touch /tmp/done
