# Ready device calls (next session), each under a 10-minute call:
#   part 1: where the FP8 expert path and the FP8 train step spend time (kernel breakdowns by named scope);
#   part 2: decoding with FP8-stored weights against BF16 (same model, same run), then the BF16 step's breakdown
#           with library kernels attributed (command buffers off);
#   part 3: MTP speculative decoding, greedy and speculative sampling (temperature 1), on `small` trained 400 steps.
#   run: setsid nohup bash tools/device/next_session.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 540          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  python3 -m experiments.bench_fp8_experts --profile --iters=10 > /tmp/profile_experts.txt 2>&1
  python3 -m experiments.profile_step --config=small --nocommand_buffers --set model.fp8=true \
      --set model.fp8_bf16_projections=kv_a_proj_with_mqa,kv_b_proj > /tmp/profile_fp8_step.txt 2>&1
elif [ "$1" = 2 ]; then
  python3 -m experiments.bench_decode --batch_sizes=1,32 --fp8_weights --record > /tmp/decode_fp8w.txt 2>&1
  python3 -m experiments.profile_step --config=small --nocommand_buffers > /tmp/profile_bf16_step.txt 2>&1
else
  python3 -m experiments.bench_mtp --temperatures=0,1 --record > /tmp/bench_mtp.txt 2>&1
fi
touch /tmp/done
