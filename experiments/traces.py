"""Summaries of jax.profiler traces: device time per step by dsjax name scope and by kernel."""

import collections
import glob
import re

SCOPES = ("ce_loss", "optimizer", "router", "routed_experts", "shared_experts", "routing_stats", "mla", "mlp", "moe")
# a generate call: per decode step the layers (attention core and cache write inside "mla"), the output head and the
# sampler; DECODE_PHASES label what runs once per call (the prompt's prefill, the layers' unstacking)
DECODE_SCOPES = ("sample", "lm_head", "attn_core", "cache_write", *SCOPES)
DECODE_PHASES = ("prefill", "unstack")


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"")


def kernel_op_names(hlo_text: str) -> dict[str, str]:
    """``{kernel name: op_name}`` from a compiled module's HLO text (``compiled.as_text()``): XLA names the kernel
    of a fusion after the fusion (``loop_add_fusion.9`` -> ``loop_add_fusion_9``) and the fusion's metadata keeps
    the JAX name stack. Inside CUDA command buffers a trace event's ``hlo_op`` is only ``command_buffer_N``, so the
    kernel name is what still leads back to the dsjax name scope (library kernels -- cuBLAS, cuDNN, Mosaic GPU --
    are named by the library and stay unattributed)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out.setdefault(m.group(1).replace(".", "_").replace("-", "_"), m.group(2))
            out.setdefault(m.group(1), m.group(2))
    return out


def scope_of(text: str, scopes: tuple[str, ...] = SCOPES) -> str:
    """The innermost of ``scopes`` (name scopes) in an op name / trace text, else ``other``; ``(bwd)`` under a
    transpose."""
    hits = [(m.start(), s) for s in scopes for m in re.finditer(rf"\b{s}\b", text)]
    scope = max(hits)[1] if hits else "other"
    return f"{scope} ({'bwd' if 'transpose(' in text else 'fwd'})"


def is_kernel_stream(line_name: str) -> bool:
    """Whether a GPU trace line is a stream that runs kernels: jax 0.11 names them after everything they carry, e.g.
    ``Stream #14(Memset,MemcpyD2D,Compute,MemcpyD2H)``; copy-only streams (``Stream #72(MemcpyD2D)``) are not."""
    name = line_name.lower()
    return "stream" in name and ("compute" in name or "memcpy" not in name)


def summarize_trace(tmp: str, steps: int, device: str = "/device:GPU", top: int = 30,
                    hlo_text: str | None = None, scopes: tuple[str, ...] = SCOPES,
                    phases: tuple[str, ...] = ()) -> None:
    """Prints the device time per step of the trace in ``tmp`` by dsjax name scope and the costliest kernels
    (``top`` of them; planes whose name starts with ``device``: pass "/device:GPU:0" for one GPU of several).
    ``hlo_text``: the compiled step's HLO, to attribute XLA's own kernels by name (:func:`kernel_op_names`).
    ``phases``: outer name scopes whose kernels are labelled ``phase: scope`` (e.g. a generate call's prefill)."""
    import jax

    path = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    by_scope = collections.Counter()
    by_kernel = collections.Counter()
    total = 0.0
    op_names = kernel_op_names(hlo_text) if hlo_text else {}
    seen_keys, lines_seen, samples = set(), set(), []
    for plane in data.planes:
        if not plane.name.startswith(device):
            continue
        for line in plane.lines:
            lines_seen.add(line.name)
            if not is_kernel_stream(line.name):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                seen_keys.update(stats)
                dur = ev.duration_ns / 1e6 / steps
                total += dur
                long = str(stats.get("tf_op", "")) + " " + str(stats.get("name", "")) + " " + \
                    str(stats.get("hlo_op", "")) + " " + op_names.get(ev.name, "") + " " + \
                    op_names.get(str(stats.get("hlo_op", "")), "")
                if len(samples) < 4 and dur > 0.5:
                    samples.append(long[:240])
                scope = scope_of(long, scopes)
                phase = next((ph for ph in phases if re.search(rf"\b{ph}\b", long)), None)
                scope = f"{phase}: {scope}" if phase else scope
                by_scope[scope] += dur
                by_kernel[(ev.name[:60] + " | " + str(stats.get("hlo_op", ""))[:40], scope)] += dur
    print(f"trace lines: {sorted(lines_seen)[:12]}; event stat keys: {sorted(seen_keys)}")
    print("sample op names:", *samples, sep="\n  ")
    print(f"device time per step: {total:.1f} ms (sum over streams)")
    for k, v in by_scope.most_common():
        print(f"  {k:32s} {v:8.2f} ms  {100 * v / total:5.1f}%")
    print("top kernels:")
    for (name, scope), v in by_kernel.most_common(top):
        print(f"  {v:7.2f} ms  {scope:16s} {name}")

