# Ready device calls (next session), each under a 10-minute call:
#   part 1 (one GPU): decoding at batch 1 and 32 against HF with BF16 and FP8-stored weights, recorded: session 15's
#           split-K in the weight-only FP8 kernel made FP8 weights 1.16x faster than BF16 at batch 1 (0.85x at 32)
#           but that call had no HF run and no --record. Then a batch-1 profile of both (what is left at batch 1).
#   part 2 (nvidia-h200-x2 or h100-x2: two GPUs): generation on a mesh against one device in one process
#           (bench_decode --mesh; session 15's sharded generation is tested for equality on 2 H200s but not timed):
#           data=2 (each GPU decodes half the rows) and expert=2 (the all-to-all per decode step).
#   part 3 (one GPU): the weight-only FP8 kernel's table in CUPTI kernel time (bench_fp8_weight_gemm's new default
#           --timer=kernels; the loop timer's ~11 us per call hid the batch-1 problem split-K fixed) with the split-K
#           sweep (is 132 programs the right threshold? does the batch-32 expert GEMM gain from 2 splits?), then the
#           MLA decode-kernel sweep with V3's batch-32 row (64-head blocks / 8 warps), cut off by session 15's limit.
#   run: setsid nohup bash tools/device/next_session.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 560          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  timeout 330 python3 -m experiments.bench_decode --batch_sizes=1,32 --fp8_weights --hf --hf_timeout_s=120 \
      --record > /tmp/decode.txt 2>&1
  cp docs/benchmarks.md /tmp/bm_after_decode.md.txt
  timeout 150 python3 -m experiments.bench_decode --batch_sizes=1 --fp8_weights --profile --profile_top=60 \
      --repeats=1 > /tmp/decode_prof.txt 2>&1
elif [ "$1" = 3 ]; then
  timeout 330 python3 -m experiments.bench_fp8_weight_gemm --record > /tmp/fp8w_bench.txt 2>&1
  cp docs/benchmarks.md /tmp/bm_after_fp8w.md.txt
  timeout 200 python3 -m experiments.bench_mla_decode --record > /tmp/mla_bench.txt 2>&1
else
  timeout 260 python3 -m experiments.bench_decode --batch_sizes=32,128 --mesh=data=2 --repeats=2 \
      > /tmp/mesh_data.txt 2>&1
  timeout 260 python3 -m experiments.bench_decode --batch_sizes=32,128 --mesh=expert=2 --repeats=2 \
      > /tmp/mesh_expert.txt 2>&1
fi
touch /tmp/done
