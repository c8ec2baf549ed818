"""Generation: decode logits equal full forwards, padding invariance, EOS handling, sampling rules, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.inference import SamplingConfig, decode_step, generate_tokens, pad_prompts, prefill, sample_tokens
from dsjax.model import init_cache


@pytest.fixture(scope="module")
def model():
    return dsjax.Transformer(dsjax.configs.tiny(), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens):
    return model(tokens).logits


def _last_logits(model, seq, width=32):
    """The full forward pass's logits at the last token of ``seq``: one compiled shape for every prefix (tokens
    after ``seq`` are right padding, which a causal, dropless model cannot see from earlier positions)."""
    x = np.zeros((1, width), np.int32)
    x[0, :len(seq)] = seq
    return _forward(model, jnp.asarray(x))[0, len(seq) - 1]


def _greedy_reference(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(_last_logits(model, seq))))
    return seq[len(prompt):]


# batch 2: 2 x K=4 pairs <= E/2, the decode step gathers the chosen experts; batch 3: every expert runs (dense)
@pytest.mark.parametrize("batch", [2, 3])
def test_decode_logits_equal_full_forward(model, batch):
    # Tolerance: float32, 1e-4 absolute on logits of magnitude ~1 (different summation orders only).
    prompts = [[1, 5, 9, 22, 40, 7, 7], [1, 7, 3], [1, 9]][:batch]
    tokens, lengths = pad_prompts(prompts, bucket=8)
    cache = init_cache(model.cfg, batch, 8 + 5)
    logits, cache = prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache, chunk=3)
    seqs = [list(p) for p in prompts]
    for i in range(5):
        for b, s in enumerate(seqs):
            ref = _last_logits(model, s)
            np.testing.assert_allclose(logits[b], ref, atol=1e-4)
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        for b in range(batch):
            seqs[b].append(int(nxt[b]))
        logits, cache = decode_step(model, nxt, jnp.asarray(lengths) + i, cache, 8 + i)


def test_greedy_generation_matches_reference_and_padding_is_invisible(model):
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0, use_eos=False, length_bucket=16)
    prompts = [[1, 5, 9, 22, 40], [1, 7, 3], [1] + list(range(30, 47))]
    out = dsjax.generate(model, prompts, sampling=cfg)
    for b, p in enumerate(prompts):
        assert out.to_lists()[b] == _greedy_reference(model, p, 6)
        alone = dsjax.generate(model, [p], sampling=cfg)  # no padding partner, another bucket for the long one
        assert alone.to_lists()[0] == out.to_lists()[b]
        np.testing.assert_allclose(alone.logprobs[0], out.logprobs[b], atol=1e-5)
    assert out.tokens.shape == (3, 6) and np.all(np.asarray(out.lengths) == 6)


def test_eos_stops_each_sample_and_masks_the_rest(model):
    base = SamplingConfig(max_new_tokens=6, temperature=0.0, use_eos=False)
    prompts = [[1, 5, 9, 22, 40], [1, 7, 3]]
    free = dsjax.generate(model, prompts, sampling=base).to_lists()
    stop = free[0][2]  # sample 0 stops at its 3rd token
    out = dsjax.generate(model, prompts, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0, use_eos=False,
                                                                 stop_ids=(stop,)))
    toks, lens, lps = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.logprobs)
    assert lens[0] == 3 and out.to_lists()[0] == free[0][:3]
    assert np.all(toks[0, 3:] == 0) and np.all(lps[0, 3:] == 0)
    first_stop = next((i for i, t in enumerate(free[1]) if t == stop), None)
    expect = 6 if first_stop is None else first_stop + 1
    assert lens[1] == expect and out.to_lists()[1] == free[1][:expect]
    # a stop exactly at the last step: length N, nothing masked
    last = free[0][5]
    if last not in free[0][:5]:
        out = dsjax.generate(model, prompts[:1], sampling=SamplingConfig(max_new_tokens=6, temperature=0.0,
                                                                         use_eos=False, stop_ids=(last,)))
        assert int(out.lengths[0]) == 6 and out.to_lists()[0] == free[0]


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(4000))
    tok, lp = sample_tokens(logits, keys, SamplingConfig(temperature=1.0))
    freq = np.bincount(np.asarray(tok), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_allclose(lp, jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))[tok], atol=1e-5)
    tok, _ = sample_tokens(logits, keys, SamplingConfig(temperature=1.0, top_k=2))
    assert set(np.unique(np.asarray(tok))) == {0, 1}
    tok, _ = sample_tokens(logits, keys, SamplingConfig(temperature=1.0, top_p=0.75))  # 0.5 + 0.3 reaches 0.75
    assert set(np.unique(np.asarray(tok))) == {0, 1}
    tok, _ = sample_tokens(logits, keys, SamplingConfig(temperature=1.0, top_p=0.4))
    assert set(np.unique(np.asarray(tok))) == {0}
    tok, lp = sample_tokens(logits, keys, SamplingConfig(temperature=2.0))
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits / 2.0)[jnp.arange(4000), tok], atol=1e-5)
    tok, _ = sample_tokens(logits, keys, SamplingConfig(temperature=0.0))
    assert np.all(np.asarray(tok) == 0)


def test_sampled_generation_is_reproducible_per_key(model):
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=50, use_eos=False)
    prompts = [[1, 5, 9], [1, 5, 9]]
    a = dsjax.generate(model, prompts, sampling=cfg, seed=3)
    b = dsjax.generate(model, prompts, sampling=cfg, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.to_lists()[0] != a.to_lists()[1]  # per-sample keys: same prompt, different samples
    # logprobs are those of a forward pass at the sampling temperature
    seq = [1, 5, 9] + a.to_lists()[0]
    ref = jax.nn.log_softmax(model(jnp.asarray([seq])).logits[0, 2:-1] / 1.0)
    np.testing.assert_allclose(a.logprobs[0], ref[jnp.arange(5), jnp.asarray(a.to_lists()[0])], atol=1e-4)


def test_same_bucket_does_not_recompile(model):
    cfg = SamplingConfig(max_new_tokens=3, temperature=0.0, length_bucket=16)
    dsjax.generate(model, [[1, 2, 3]], sampling=cfg)
    size = generate_tokens._cache_size()
    dsjax.generate(model, [[1, 9, 8, 7, 6, 5]], sampling=cfg)
    dsjax.generate(model, [[4] * 16], sampling=cfg)
    assert generate_tokens._cache_size() == size


@pytest.mark.parametrize("unroll", [4])  # a tail of masked steps (7 new tokens) and a stop inside an unrolled block
def test_unrolled_decode_loop_gives_the_same_tokens(model, unroll):
    prompts = [[1, 5, 9, 22, 40], [1, 7, 3]]
    base = SamplingConfig(max_new_tokens=7, temperature=0.0, use_eos=False)
    ref = dsjax.generate(model, prompts, sampling=base)
    free = ref.to_lists()
    for stop in (None, free[0][2]):
        kw = dict(stop_ids=(stop,)) if stop is not None else {}
        a = dsjax.generate(model, prompts, sampling=SamplingConfig(max_new_tokens=7, temperature=0.0, use_eos=False,
                                                                   **kw))
        b = dsjax.generate(model, prompts, sampling=SamplingConfig(max_new_tokens=7, temperature=0.0, use_eos=False,
                                                                   decode_unroll=unroll, **kw))
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)


def test_generate_cli_on_a_workdir(tmp_path):
    import json
    import os
    import pathlib
    import subprocess
    import sys

    from dsjax.train import config as tc
    from dsjax.train.loop import run

    root = pathlib.Path(__file__).resolve().parent.parent
    cfg = tc.apply_overrides(tc.tiny(), ["steps=2", "checkpoint.every=2", "data.seq_len=32", "data.batch_size=2",
                                         "model.num_hidden_layers=2", "tensorboard=false", "progress_bar=false"])
    run(cfg, tmp_path / "wd", log_fn=lambda s: None)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "experiments.generate", f"--checkpoint={tmp_path / 'wd'}",
                          "--prompt=def f(x):", "--max_new_tokens=5", "--temperature=0"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--- prompt: 'def f(x):'" in res.stdout and "tokens in" in res.stdout
    (tmp_path / "p.jsonl").write_text('{"prompt": "import"}\n{"prompt": "class", "id": 7}\n')
    res = subprocess.run([sys.executable, "-m", "experiments.generate", f"--checkpoint={tmp_path / 'wd'}",
                          f"--jsonl={tmp_path / 'p.jsonl'}", f"--out={tmp_path / 'o.jsonl'}", "--max_new_tokens=4",
                          "--speculative"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["import", "class"] and rows[1]["id"] == 7
    assert all(r["num_tokens"] == 4 for r in rows) and "MTP draft acceptance" in res.stdout


def test_generate_cli_on_an_hf_folder_with_fp8_weights(tmp_path):
    """``experiments.generate --keep_fp8`` on a hub folder: the weights are quantised on load (128x128 blocks) and
    generation runs; the greedy tokens equal those of the same folder loaded in FP8 through the library. On a
    dsjax workdir the flag is a usage error."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    from dsjax.data import DataConfig, make_tokenizer

    root = pathlib.Path(__file__).resolve().parent.parent
    folder = tmp_path / "hf"
    dsjax.save_hf(dsjax.Transformer(dsjax.configs.tiny(), rngs=nnx.Rngs(4)), None, folder)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    (tmp_path / "p.jsonl").write_text('{"prompt": "abc"}\n')
    cmd = [sys.executable, "-m", "experiments.generate", f"--checkpoint={folder}", "--tokenizer=bytes",
           f"--jsonl={tmp_path / 'p.jsonl'}", f"--out={tmp_path / 'o.jsonl'}", "--max_new_tokens=6",
           "--temperature=0", "--dtype=float32", "--keep_fp8"]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((tmp_path / "o.jsonl").read_text())
    tok = make_tokenizer(DataConfig(tokenizer="bytes"))
    model = dsjax.load_hf(folder, dtype=jnp.float32, keep_fp8=True)
    assert model.fp8_block == (128, 128)
    prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode("abc")      # as the CLI encodes
    out = dsjax.generate(model, [prompt], sampling=SamplingConfig(max_new_tokens=6, temperature=0.0),
                         key=jax.random.key(0))
    gen = out.to_lists()[0]
    assert row["num_tokens"] == len(gen) and row["completion"] == tok.decode(gen)
    assert abs(row["logprob"] - float(jnp.sum(out.logprobs[0, :len(gen)]))) < 1e-3
    plain = dsjax.generate(dsjax.load_hf(folder, dtype=jnp.float32), [prompt],   # (the flag matters: FP32 differs)
                           sampling=SamplingConfig(max_new_tokens=6, temperature=0.0), key=jax.random.key(0))
    assert abs(row["logprob"] - float(jnp.sum(plain.logprobs[0, :len(plain.to_lists()[0])]))) > 1e-3
    (tmp_path / "wd" / "checkpoints").mkdir(parents=True)                   # a dsjax workdir's shape
    bad = subprocess.run([*cmd[:3], f"--checkpoint={tmp_path / 'wd'}", "--prompt=x", "--keep_fp8"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--keep_fp8 applies to HF folders" in bad.stderr


def test_unstacked_layers_decode_like_the_scanned_model():
    """``unstack_layers`` (the decode loop's default on a ``scan_layers=True`` model) gives layer i slice i of the
    stacks, the same logits, and the same generated tokens and log-probs as decoding through the layer scan."""
    from dsjax.model import unstack_layers

    model = dsjax.Transformer(dsjax.configs.tiny(scan_layers=True), rngs=nnx.Rngs(3))
    flat = unstack_layers(model)
    assert flat.cfg.scan_layers is False and flat.dense_layers is None
    assert len(flat.layers) == model.cfg.num_hidden_layers
    k = model.cfg.first_k_dense_replace
    e = model.cfg.n_routed_experts            # (the shared expert folded in after them: the next test)
    np.testing.assert_array_equal(flat.layers[k + 1].mlp.experts.gate_proj[...][:e],
                                  model.moe_layers.mlp.experts.gate_proj[...][1])
    np.testing.assert_array_equal(flat.layers[k + 1].mlp.gate.e_score_correction_bias[...],
                                  model.moe_layers.mlp.gate.e_score_correction_bias[...][1])
    ids = jnp.asarray([[1, 5, 9, 22, 40, 3, 7, 8]])
    np.testing.assert_allclose(_forward(flat, ids), _forward(model, ids), atol=1e-5)
    assert unstack_layers(flat) is flat
    prompts = [[1, 5, 9, 22, 40], [1, 7, 3]]
    kw = dict(max_new_tokens=4, temperature=0.0, use_eos=False, length_bucket=8)
    a = dsjax.generate(model, prompts, sampling=SamplingConfig(**kw))
    b = dsjax.generate(model, prompts, sampling=SamplingConfig(unstack_layers=False, **kw))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("n_shared", [1, 2])
def test_unstacked_model_folds_shared_experts_into_the_routed_stacks(n_shared):
    """Where unstacking copies the layer weights (a scanned model), each MoE layer's shared experts (``n_shared``
    of them: the shared MLP split into experts of ``moe_intermediate_size``) become the routed stacks' last experts,
    chosen by every token with weight 1: the stacks hold the shared MLP's kernel slices, the shared MLP is gone, and
    the logits equal the unfolded copy's (float32: summation order apart) on every expert path -- gathered (1-2
    tokens), dense decode (8 tokens, 4 per row) and grouped (a prompt) -- and so do greedy generation and MTP
    speculative decoding. ``fold_shared_experts=False`` (``SamplingConfig.fold_shared_experts``) keeps them apart; an
    unscanned model (whose arrays unstacking shares) and a model under a sharding plan are not folded."""
    from dsjax.model import unstack_layers
    from dsjax.sharding import MeshConfig, make_plan, use_plan

    cfg = dsjax.configs.tiny(scan_layers=True, n_shared_experts=n_shared, num_nextn_predict_layers=1)
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(6))
    flat, apart = unstack_layers(model), unstack_layers(model, fold_shared_experts=False)
    e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
    for moe in [flat.layers[cfg.first_k_dense_replace].mlp, flat.mtp[0].block.mlp]:
        assert moe.shared_experts is None and moe.experts.n_folded == n_shared
        assert moe.experts.gate_proj[...].shape[0] == e + n_shared
    moe, ref = flat.layers[-1].mlp, apart.layers[-1].mlp
    assert ref.shared_experts is not None and ref.experts.n_folded == 0
    for i in range(n_shared):
        np.testing.assert_array_equal(moe.experts.gate_proj[...][e + i],
                                      ref.shared_experts.gate_proj.kernel[...][:, i * f:(i + 1) * f])
        np.testing.assert_array_equal(moe.experts.down_proj[...][e + i],
                                      ref.shared_experts.down_proj.kernel[...][i * f:(i + 1) * f])
    for shape in [(1, 1), (2, 1), (8, 1), (2, 4), (3, 17)]:
        ids = jax.random.randint(jax.random.key(sum(shape)), shape, 3, cfg.vocab_size)
        np.testing.assert_allclose(_forward(flat, ids), _forward(apart, ids), atol=2e-6, err_msg=str(shape))
    prompts = [[1, 5, 9, 22, 40], [1, 7, 3]]
    kw = dict(max_new_tokens=6, temperature=0.0, use_eos=False, length_bucket=8)
    a, b = (dsjax.generate(model, prompts, sampling=SamplingConfig(fold_shared_experts=c, **kw)) for c in (True, False))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    from dsjax.inference import speculative_generate

    s = speculative_generate(model, prompts, sampling=SamplingConfig(**kw))
    np.testing.assert_array_equal(s.output.tokens, b.tokens)

    unscanned = dsjax.Transformer(cfg.replace(scan_layers=False), rngs=nnx.Rngs(6))
    assert unstack_layers(unscanned).layers[-1].mlp.shared_experts is not None
    with use_plan(make_plan(MeshConfig(data=-1))):
        assert unstack_layers(model).layers[-1].mlp.shared_experts is not None


def test_unstacked_model_carries_mla_decode_copies():
    """``unstack_layers`` gives every MLA module (layers and MTP blocks) its decoding copies: ``W_UK``/``W_UV``
    equal to ``kv_b_proj``'s halves and ``qkv_a`` equal to the two down-projection kernels side by side, so the
    decode loop re-derives neither; the forward is unchanged, an unscanned model's own modules stay untouched, a
    prepared model is returned as is, and ``decode_copies=False`` (``SamplingConfig.decode_copies``, for A/B timing)
    leaves them out; greedy generation is the same either way."""
    from dsjax.model import unstack_layers
    from dsjax.model.layers import DecodeCopy

    for scan in (True, False):
        model = dsjax.Transformer(dsjax.configs.tiny(scan_layers=scan, num_nextn_predict_layers=1),
                                  rngs=nnx.Rngs(5))
        flat = unstack_layers(model)
        mlas = [layer.self_attn for layer in flat.layers] + [flat.mtp[0].block.self_attn]
        c = model.cfg.qk_nope_head_dim
        for attn in mlas:
            w = attn.kv_b_proj.weight()
            assert isinstance(attn.w_uk, DecodeCopy) and isinstance(attn.qkv_a, DecodeCopy)
            np.testing.assert_array_equal(attn.w_uk[...], w[..., :c])
            np.testing.assert_array_equal(attn.w_uv[...], w[..., c:])
            np.testing.assert_array_equal(attn.qkv_a[...], np.concatenate(
                [attn.q_a_proj.weight(), attn.kv_a_proj_with_mqa.weight()], axis=-1))
        if not scan:
            assert model.layers[0].self_attn.w_uk is None
            assert unstack_layers(model, decode_copies=False) is model
        else:
            assert unstack_layers(model, decode_copies=False).layers[0].self_attn.w_uk is None
        assert unstack_layers(flat) is flat
        ids = jnp.asarray([[1, 5, 9, 22, 40, 3, 7, 8]])
        np.testing.assert_allclose(_forward(flat, ids), _forward(model, ids), atol=1e-5)
    kw = dict(max_new_tokens=4, temperature=0.0, use_eos=False, length_bucket=8)
    a, b = (dsjax.generate(model, [[1, 5, 9, 22, 40], [1, 7, 3]], sampling=SamplingConfig(decode_copies=c, **kw))
            for c in (True, False))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_unstacked_master_weights_are_copied_in_the_compute_dtype():
    """float32 master weights with bf16 compute (GRPO rollouts): the unstacked copy holds the matmul weights in bf16
    (half the memory and the decode reads), exactly the cast each use makes, and the router and norms in float32.
    (Logits match the scanned model's to bf16 rounding: XLA fuses an unrolled bf16 stack differently from the scan,
    with or without the cast.)"""
    from dsjax.model import unstack_layers

    model = dsjax.Transformer(dsjax.configs.tiny(scan_layers=True, dtype="bfloat16", param_dtype="float32"),
                              rngs=nnx.Rngs(4))
    flat = unstack_layers(model)
    layer = flat.layers[model.cfg.first_k_dense_replace]
    assert layer.mlp.experts.down_proj[...].dtype == jnp.bfloat16
    assert layer.self_attn.kv_b_proj.kernel[...].dtype == jnp.bfloat16
    assert layer.mlp.gate.weight[...].dtype == jnp.float32 and layer.input_layernorm.weight[...].dtype == jnp.float32
    np.testing.assert_array_equal(layer.mlp.experts.down_proj[...][:model.cfg.n_routed_experts],
                                  model.moe_layers.mlp.experts.down_proj[...][0].astype(jnp.bfloat16))
    ids = jnp.asarray([[1, 5, 9, 22, 40, 3, 7, 8]])
    np.testing.assert_allclose(np.asarray(_forward(flat, ids), np.float32),
                               np.asarray(_forward(model, ids), np.float32), atol=2e-2)
