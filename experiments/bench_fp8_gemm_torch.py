"""cuBLAS blockwise FP8 GEMM through ``torch._scaled_mm`` (1x128 activation / 128x128 weight scales): the baseline of
experiments/bench_fp8_gemm.py, run in its own process so JAX's GPU memory preallocation does not starve it.

    python experiments/bench_fp8_gemm_torch.py '[[M, N, K], ...]' ITERS

Prints one JSON line per shape: TFLOPS (median of ITERS CUDA-event timings) and the relative error against an f32
product of the same dequantised operands. Layouts cuBLAS accepts (see docs of the design note): ``a8 [M, K]``
row-major, ``b8 [N, K]`` passed as ``b8.t()``, ``scale_a [M, K/128]`` column-major, ``scale_b`` the ``[K/128, N/128]``
transpose view of the ``[N/128, K/128]`` block grid.
"""

import json
import statistics
import sys

import torch

E4M3_MAX = 448.0


def quant_rows(x):  # 1x128 tiles
    m, k = x.shape
    t = x.float().view(m, k // 128, 128)
    s = t.abs().amax(-1).clamp_min(1e-4) / E4M3_MAX
    return (t / s[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(m, k), s


def quant_blocks(w):  # 128x128 blocks (N padded to a whole block)
    n, k = w.shape
    nb = -(-n // 128)
    wp = torch.nn.functional.pad(w.float(), (0, 0, 0, nb * 128 - n))
    t = wp.view(nb, 128, k // 128, 128)
    s = t.abs().amax(dim=(1, 3)).clamp_min(1e-4) / E4M3_MAX
    q = (t / s[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(nb * 128, k)[:n]
    return q, s


def main():
    shapes, iters = json.loads(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    for m, n, k in shapes:
        row = {"m": m, "n": n, "k": k}
        try:
            x = torch.randn(m, k, device="cuda")
            w = torch.randn(n, k, device="cuda") * 0.02
            a8, sa = quant_rows(x)
            b8, sb = quant_blocks(w)
            sa_cm = sa.t().contiguous().t()
            sb_t = sb.t()

            def run():
                return torch._scaled_mm(a8, b8.t(), scale_a=sa_cm, scale_b=sb_t, out_dtype=torch.bfloat16)

            out = run()
            a32 = a8.float() * sa.repeat_interleave(128, dim=1)
            b32 = b8.float() * sb.repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)
            ref = a32 @ b32.t()
            row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
            for _ in range(3):
                run()
            times = []
            for _ in range(iters):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                run()
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3)
            row["tflops"] = 2 * m * n * k / statistics.median(times) / 1e12
            del x, w, a8, b8, a32, b32, ref, out
        except Exception as e:  # noqa: BLE001  (reported in the table)
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
