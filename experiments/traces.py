"""Summaries of jax.profiler traces: device time per step by dsjax name scope and by kernel."""

import collections
import glob
import re

SCOPES = ("ce_loss", "optimizer", "router", "routed_experts", "shared_experts", "routing_stats", "mla", "mlp", "moe")


def summarize_trace(tmp: str, steps: int, device: str = "/device:GPU", top: int = 30) -> None:
    """Prints the device time per step of the trace in ``tmp`` by dsjax name scope and the costliest kernels
    (``top`` of them; planes whose name starts with ``device``: pass "/device:GPU:0" for one GPU of several)."""
    import jax

    path = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    by_scope = collections.Counter()
    by_kernel = collections.Counter()
    total = 0.0
    seen_keys, lines_seen, samples = set(), set(), []
    for plane in data.planes:
        if not plane.name.startswith(device):
            continue
        for line in plane.lines:
            lines_seen.add(line.name)
            if "stream" not in line.name.lower() or "memcpy" in line.name.lower():
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                seen_keys.update(stats)
                dur = ev.duration_ns / 1e6 / steps
                total += dur
                long = str(stats.get("tf_op", "")) + " " + str(stats.get("name", "")) + " " + \
                    str(stats.get("hlo_op", ""))
                if len(samples) < 4 and dur > 0.5:
                    samples.append(long[:240])
                scope = next((s for s in SCOPES if re.search(rf"\b{s}\b", long)), "other")
                back = "bwd" if "transpose(" in long else "fwd"
                by_scope[f"{scope} ({back})"] += dur
                by_kernel[(ev.name[:60] + " | " + str(stats.get("hlo_op", ""))[:40], scope)] += dur
    print(f"trace lines: {sorted(lines_seen)[:12]}; event stat keys: {sorted(seen_keys)}")
    print("sample op names:", *samples, sep="\n  ")
    print(f"device time per step: {total:.1f} ms (sum over streams)")
    for k, v in by_scope.most_common():
        print(f"  {k:32s} {v:8.2f} ms  {100 * v / total:5.1f}%")
    print("top kernels:")
    for (name, scope), v in by_kernel.most_common(top):
        print(f"  {v:7.2f} ms  {scope:16s} {name}")

