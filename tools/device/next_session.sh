# Ready device calls (next session), each under a 10-minute call:
#   part 1: the weight-only FP8 decode kernels on the GPU: their tests (GEMM and the fused gate/up/SwiGLU, new in
#           session 13), their device-time table and tiling sweep (bench_fp8_weight_gemm), then decoding at batch 1
#           and 32 against HF with BF16 and FP8-stored weights (FP8 ran 0.91x / 0.82x BF16 before the fused kernel
#           and the 128-column tiles at batch 1).
#   part 2: MTP speculative decoding with 1, 2 and 3 drafts per verification forward (chained MTP drafts, new in
#           session 13), greedy, at batch 1 and 32 (1 draft: 1.34x / 1.23x on an H200, target 1.5x).
#   part 3: where the time goes, now that the trace reader sees the compute stream (it read nothing before session
#           13): a generate call at batch 1 and 32 by scope (prefill / MLA / attention core / experts / head /
#           sampler); the train step with the cross-entropy backward before and after session 13's change
#           (tools/device/ce_ab.py); the BF16 train step's breakdown with command buffers off.
#   run: setsid nohup bash tools/device/next_session.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 540          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  JAX_PLATFORMS=cuda,cpu timeout 200 python3 -m pytest -q -m gpu tests/test_fp8_weight_gemm.py \
      -p no:cacheprovider > /tmp/gpu_test_fp8w.txt 2>&1
  timeout 200 python3 -m experiments.bench_fp8_weight_gemm --record > /tmp/fp8w_bench.txt 2>&1
  python3 -m experiments.bench_decode --batch_sizes=1,32 --fp8_weights --hf --record > /tmp/decode.txt 2>&1
elif [ "$1" = 2 ]; then
  # greedy only (the identity check holds there); sampled runs doubled the call's decode part last time
  python3 -m experiments.bench_mtp --config=small --steps=400 --draft_tokens=1,2,3 --temperatures=0 \
      --record > /tmp/mtp.txt 2>&1
else
  timeout 240 python3 -m experiments.bench_decode --batch_sizes=1,32 --profile --repeats=2 > /tmp/decode_prof.txt 2>&1
  timeout 200 python3 tools/device/ce_ab.py --steps=10 > /tmp/ce_ab.txt 2>&1    # CE backward before/after, one call
  python3 -m experiments.profile_step --config=small --nocommand_buffers > /tmp/profile_bf16_step.txt 2>&1
fi
touch /tmp/done
