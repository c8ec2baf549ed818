# Ready device calls (next session), each under a 10-minute call:
#   part 1: decoding. The fused MLA decode attention's tiling sweep with more heads per program (bench_mla_decode:
#           V3's 128 heads read the cache once per 32-head block, 0.82 TB/s at batch 32 in session 14), then
#           decoding at batch 1 and 32 against HF with BF16 and FP8-stored weights (the fused FP8 SwiGLU kernel and
#           the once-per-call MLA dequantisation, session 13, are not timed in decoding yet; the scatter-free group
#           routing of session 14 neither). HF's batch-32 generate outlived a 280 s limit in session 14; each HF run now
#           gets --hf_timeout_s, so the table is recorded even when HF is cut off.
#   part 2: MTP with 1 and 3 chained drafts, greedy, at batch 1 and 32, with --f32_check (do the BF16 differences
#           from plain greedy vanish in float32?), then a decode profile at batch 1 and 32 by scope.
#   part 3: the FP8 weight-only kernel's device-time table and sweep (bench_fp8_weight_gemm; new in session 14: the
#           float16-MMA variant, which tests whether the E4M3 -> BF16 conversion is what halves the kernel's
#           bandwidth, and the W8A8 table: act_quant + the Mosaic GPU FP8 GEMM on [N, K] weights, DeepSeek's other
#           inference scheme), then the train step against HF (the cross-entropy backward and the group routing
#           changed since the last HF comparison).
#   run: setsid nohup bash tools/device/next_session.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 560          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  timeout 150 python3 -m experiments.bench_mla_decode --record > /tmp/mla_bench.txt 2>&1
  cp docs/benchmarks.md /tmp/bm_after_mla.md.txt
  timeout 400 python3 -m experiments.bench_decode --batch_sizes=1,32 --fp8_weights --hf --hf_timeout_s=170 \
      --record > /tmp/decode.txt 2>&1
elif [ "$1" = 2 ]; then
  timeout 380 python3 -m experiments.bench_mtp --config=small --steps=400 --draft_tokens=1,3 --temperatures=0 \
      --f32_check --record > /tmp/mtp.txt 2>&1
  cp docs/benchmarks.md /tmp/bm_after_mtp.md.txt
  timeout 170 python3 -m experiments.bench_decode --batch_sizes=1,32 --profile --repeats=1 > /tmp/decode_prof.txt 2>&1
else
  timeout 200 python3 -m experiments.bench_fp8_weight_gemm --record > /tmp/fp8w_bench.txt 2>&1
  cp docs/benchmarks.md /tmp/bm_after_fp8w.md.txt
  timeout 340 python3 -m experiments.bench_train --steps=10 --hf --record > /tmp/train.txt 2>&1
fi
touch /tmp/done
