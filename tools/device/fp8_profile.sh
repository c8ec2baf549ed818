# Ready device call (next session), under 10 minutes: where the FP8 expert path and the FP8 train step spend time.
#   run: setsid nohup bash tools/device/fp8_profile.sh > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 540          (carry: .whl)
source tools/device/setup.sh
python3 -m experiments.bench_fp8_experts --profile --iters=10 > /tmp/profile_experts.txt 2>&1
P=model.fp8_bf16_projections=kv_a_proj_with_mqa,kv_b_proj
python3 -m experiments.profile_step --config=small --nocommand_buffers --set model.fp8=true --set $P \
    > /tmp/profile_fp8_step.txt 2>&1
python3 -m experiments.profile_step --config=small --nocommand_buffers > /tmp/profile_bf16_step.txt 2>&1
touch /tmp/done
