"""Synthetic packed batches for benchmarks (no flags: importable by any launcher)."""


def synthetic_batch(b: int, t: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(b, t), dtype=np.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for i in range(b):
        start, sid = 0, 1
        while start < t:
            n = int(min(t - start, rng.integers(t // 8, t)))
            seg[i, start:start + n] = sid
            pos[i, start:start + n] = np.arange(n)
            start, sid = start + n, sid + 1
    mask = np.ones((b, t), np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": mask}
