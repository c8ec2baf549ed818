# Ready device calls (next session), each under a 10-minute call:
#   part 1: cuDNN's packed-document attention (attention_impl="cudnn_packed", opt-in): its GPU test against the
#           einsum path, then the train step with and without it (and HF's workload for the vs-HF column);
#   part 2: where the FP8 expert path and the FP8 train step spend time (kernel breakdowns by named scope);
#   part 3: the weight-only FP8 kernel's GPU tests, then decoding at batch 1 and 32 against HF, BF16 weights and
#           FP8-stored weights (the FP8 row ran 0.58-0.87x BF16 before the kernel), then the BF16 step's breakdown
#           with library kernels attributed (command buffers off).
#   run: setsid nohup bash tools/device/next_session.sh 1 > /tmp/x.log 2>&1 < /dev/null & sleep 5; \
#        bash tools/device/poll.sh 540          (carry: .whl; copy the records out of $OUT by hand)
source tools/device/setup.sh
if [ "$1" = 1 ]; then
  JAX_PLATFORMS=cuda,cpu timeout 240 python3 -m pytest -q -m gpu tests/test_model.py -k "cudnn_packed or dots_attn" \
      -p no:cacheprovider > /tmp/gpu_test_packed.txt 2>&1
  python3 -m experiments.bench_train --steps=10 --hf --variant= --variant=model.attention_impl=cudnn_packed \
      --variant=unpacked,model.num_nextn_predict_layers=0,loss.mtp_lambda=0 --record > /tmp/train_packed.txt 2>&1
elif [ "$1" = 2 ]; then
  python3 -m experiments.bench_fp8_experts --profile --iters=10 > /tmp/profile_experts.txt 2>&1
  python3 -m experiments.profile_step --config=small --nocommand_buffers --set model.fp8=true \
      --set model.fp8_bf16_projections=kv_a_proj_with_mqa,kv_b_proj > /tmp/profile_fp8_step.txt 2>&1
else
  JAX_PLATFORMS=cuda,cpu timeout 240 python3 -m pytest -q -m gpu tests/test_fp8_weight_gemm.py \
      -p no:cacheprovider > /tmp/gpu_test_fp8w.txt 2>&1
  python3 -m experiments.bench_decode --batch_sizes=1,32 --fp8_weights --hf --record > /tmp/decode.txt 2>&1
  cp docs/benchmarks.md /tmp/bm_decode.md.txt
  python3 -m experiments.profile_step --config=small --nocommand_buffers > /tmp/profile_bf16_step.txt 2>&1
fi
touch /tmp/done
