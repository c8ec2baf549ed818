# Ready device calls (next session), each under a 10-minute call:
#   part 1 (one GPU): did session 16's decode copies (unstack_layers -> add_decode_copies: W_UK/W_UV and the merged
#           q_a|kv_a kernel made once per call) remove the per-step slices and the dot-merger concatenation from the
#           compiled batch-32 loop? (tools/decode_hlo_ops.py: look for [256,16,64] slices and a [1024,672]
#           concatenate inside the while body); then decoding at batch 1 and 32 against HF with BF16 and FP8-stored
#           weights and, as the A/B of the copies in the same process, BF16 with sampling.decode_copies=False,
#           recorded (session 16 measured the copies only against a call on another machine).
#   part 2 (nvidia-h200-x2 or h100-x2: two GPUs): generation on a mesh against one device in one process
#           (bench_decode --mesh; session 15's sharded generation is tested for equality on 2 H200s but not timed):
#           data=2 (each GPU decodes half the rows) and expert=2 (the all-to-all per decode step).
#   part 3 (one GPU): the MLA decode-kernel sweep with V3's batch-32 row (cut off by the 150 s / 200 s limits of
#           sessions 15 and 16), then the weight-only FP8 kernel's table again (session 16 recorded it once).
#   run: setsid nohup bash tools/device/next_session.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 560          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  timeout 90 python3 tools/decode_hlo_ops.py small 32 > /tmp/hlo_ops.txt 2>&1
  timeout 420 python3 -m experiments.bench_decode --batch_sizes=1,32 --fp8_weights \
      --variant=sampling.decode_copies=False --hf --hf_timeout_s=90 --record > /tmp/decode.txt 2>&1
  cp docs/benchmarks.md /tmp/bm_after_decode.md.txt
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
