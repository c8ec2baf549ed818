# Ready device calls (next session), each under a 10-minute call:
#   part 1 (one GPU, the issue's H100: --kind nvidia-h100-x1): session 18's routing kernel (pallas_kernels.moe_topk)
#           was A/B-timed without HF and without the FP8-stored rows (1.09x / 1.06x at batch 1 / 32); this times
#           both again (BF16 against routing_impl=xla), the FP8-stored rows and HF for the ratios, after the
#           GPU test of the kernel and its table with V2's padded groups (added after the session's device time).
#   part 2 (nvidia-h200-x2 or h100-x2: two GPUs): generation on a mesh against one device in one process
#           (bench_decode --mesh; session 15's sharded generation is tested for equality on 2 H200s but not timed):
#           data=2 (each GPU decodes half the rows) and expert=2 (the all-to-all per decode step).
#   part 3 (one GPU): the MLA decode-kernel sweep with V3's batch-32 row (cut off by the 150 s / 200 s limits of
#           sessions 15 and 16), then the weight-only FP8 kernel's table again (session 16 recorded it once).
#   run: setsid nohup bash tools/device/next_session.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 560          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  JAX_PLATFORMS=cuda timeout 100 python3 -m pytest -q -m gpu tests/test_moe_topk.py -p no:warnings -rs \
      > /tmp/gputest.txt 2>&1
  timeout 120 python3 -m experiments.bench_moe_topk --record > /tmp/topk.txt 2>&1
  timeout 420 python3 -m experiments.bench_decode --batch_sizes=1,32 --repeats=3 --fp8_weights \
      --variant=routing_impl=xla --hf --hf_timeout_s=90 --record > /tmp/decode.txt 2>&1
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
