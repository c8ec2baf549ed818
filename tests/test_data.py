"""dsjax.data: tokenizers, sources, arithmetic task, packing invariants, determinism, resume, sharding, errors."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dsjax import data
from dsjax.data import sources, synthetic
from dsjax.data import DataConfig, DataError, make_dataset, make_tokenizer

BYTES = data.ByteTokenizer()
TEXTS = [
    "héllo wörld — ünïcode ✓ and 🙂 emoji\n" * 3,
    "def f(x):\n    return x + 1\n",
    "short",
    "a much longer document " * 40,
    "日本語のテキスト。" * 5,
]


def _ds(cfg, tok=BYTES, pi=0, pc=1):
    return make_dataset(cfg, tok, process_index=pi, process_count=pc)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.fixture
def text_files(tmp_path):
    for i, t in enumerate(TEXTS):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    return str(tmp_path / "*.txt")


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc-{i:04d} " + "x" * (i % 17)}) + "\n" for i in range(400)))
    return str(path)


# ----------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    for t in TEXTS + ["", "\x00\xff"]:
        ids = BYTES.encode(t)
        assert all(3 <= i < 259 for i in ids) and BYTES.decode(ids) == t
    assert (BYTES.vocab_size, BYTES.pad_id, BYTES.bos_id, BYTES.eos_id) == (259, 0, 1, 2)
    assert BYTES.encode("A") == [ord("A") + 3]
    assert BYTES.decode([1] + BYTES.encode("ok") + [2, 0, 0]) == "ok"  # specials skipped
    assert BYTES.decode([0xC3 + 3]) == "\ufffd"  # truncated utf-8 -> replacement char
    assert isinstance(BYTES, data.Tokenizer)


def _hf_tokenizer_file(tmp_path, specials=("<pad>", "<s>", "</s>", "<unk>")):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS + ["the quick brown fox jumps over the lazy dog"] * 5, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path, text_files):
    path = _hf_tokenizer_file(tmp_path)
    tok = make_tokenizer(DataConfig(tokenizer=path))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 300
    for t in TEXTS:
        ids = tok.encode(t)
        assert tok.bos_id not in ids and tok.decode(ids) == t
    assert tok.decode([tok.bos_id] + tok.encode("fox") + [tok.eos_id]) == "fox"
    assert make_tokenizer(DataConfig(tokenizer=str(tmp_path))).vocab_size == 300  # directory works too
    assert make_tokenizer(DataConfig(tokenizer=path, bos_id=7, eos_id=8)).bos_id == 7
    data.check_vocab(tok, 300)
    with pytest.raises(DataError, match="300 ids but the model's vocab_size is 259"):
        data.check_vocab(tok, 259)
    cfg = DataConfig(source="text", paths=(text_files,), tokenizer=path, seq_len=32, batch_size=1, num_epochs=1,
                     shuffle=False)
    tokens = np.concatenate([t for b in _ds(cfg, tok) for t, _ in _check_rows(b, 32, 1)])
    assert tokens.max() < 300 and (tokens == tok.bos_id).sum() == (tokens == tok.eos_id).sum() >= 3


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json.*no such file"):
        make_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json.*cannot load"):
        make_tokenizer(DataConfig(tokenizer=str(tmp_path / "bad.json")))
    sub = tmp_path / "nobos"
    sub.mkdir()
    path = _hf_tokenizer_file(sub, specials=("<unk>",))
    with pytest.raises(DataError, match="bos tokens.*DataConfig.bos_id"):
        make_tokenizer(DataConfig(tokenizer=path))
    with pytest.raises(DataError, match="eos_id=9999: outside"):
        make_tokenizer(DataConfig(tokenizer=path, bos_id=0, eos_id=9999))
    with pytest.raises(DataError, match="bos_id=5: the byte tokenizer's ids are fixed"):
        make_tokenizer(DataConfig(bos_id=5))


# ------------------------------------------------------------------------------------------------- packing


def _check_rows(batch, seq_len, b):
    """Invariants shared by all sources; returns the list of segments as (tokens, loss_mask) pairs."""
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
    for v in batch.values():
        assert v.dtype == np.int32 and v.shape == (b, seq_len)
    segments = []
    for tok, seg, pos, mask in zip(batch["tokens"], batch["segment_ids"], batch["positions"], batch["loss_mask"]):
        real = seg > 0
        assert seg[0] == 1 and np.all(real[:-1] >= real[1:])  # starts at 1; padding only at the end
        assert np.all(np.diff(seg[real]) >= 0) and np.all(np.diff(seg[real]) <= 1)
        assert np.all(mask[~real] == 0) and np.all(tok[~real] == 0) and np.all(pos[~real] == 0)
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(pos[idx], np.arange(len(idx)))  # positions restart at 0 per segment
            assert mask[idx[0]] == 0  # a segment's first token is never a target
            segments.append((tok[idx], mask[idx]))
    return segments


def test_pretraining_packing_reconstructs_documents(text_files, monkeypatch):
    monkeypatch.setattr(sources, "MAX_DOC_BYTES", 50)  # cut the long documents into pieces
    cfg = DataConfig(source="text", paths=(text_files,), seq_len=24, batch_size=2, shuffle=False, num_epochs=1)
    batches = list(_ds(cfg))
    segments = [s for b in batches for s in _check_rows(b, 24, 2)]
    stream = np.concatenate([t for t, _ in segments])
    docs = sources.index_files(sources.expand_globs(cfg.paths))
    keep = sources.split_indices(docs, "train")
    expected = np.concatenate(
        [[1] * (docs[i][1] == 0) + BYTES.encode(sources.read_piece(docs.paths[docs[i][0]], *docs[i][1:3],
                                                                    docs.sizes[docs[i][0]]))
         + [2] * (docs[i][2] == docs.sizes[docs[i][0]]) for i in keep])
    assert len(stream) > 0.8 * len(expected) and np.array_equal(stream, expected[: len(stream)])
    for tok, mask in segments:  # pretraining: every token but the segment's first is a target; bos never
        assert np.all(mask[1:] == 1) and np.all(mask[tok == 1] == 0)


def test_pieces_cover_file_exactly(tmp_path, monkeypatch):
    text = "".join(TEXTS) * 3
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    for piece in (7, 50, 1000):
        monkeypatch.setattr(sources, "MAX_DOC_BYTES", piece)
        docs = sources.index_files([(str(tmp_path / "big.txt"), "big.txt")])
        assert len(docs) == -(-len(text.encode()) // piece)
        assert "".join(sources.read_piece(docs.paths[0], s, e, docs.sizes[0]) for _, s, e, _ in
                       (docs[i] for i in range(len(docs)))) == text


def test_sft_mask_covers_completion_and_eos(tmp_path):
    path = synthetic.write_arithmetic_jsonl(tmp_path / "sft" / "a.jsonl", 200, seed=3)
    examples = {synthetic.arithmetic_example(3, i)["prompt"]: synthetic.arithmetic_example(3, i) for i in range(200)}
    cfg = DataConfig(source="sft", paths=(path,), seq_len=256, batch_size=4)
    for batch in _take(iter(_ds(cfg)), 5):
        for tok, mask in _check_rows(batch, 256, 4):
            assert tok[0] == 1 and tok[-1] == 2
            text = BYTES.decode(tok)
            ex = examples[text[: text.index("A: ") + 3]]
            assert text == ex["prompt"] + ex["completion"]
            assert list(tok[mask == 1]) == BYTES.encode(ex["completion"]) + [2]  # completion + eos only


def test_arithmetic_source_masks_everything_but_bos():
    cfg = DataConfig(source="arithmetic", arithmetic_examples=300, seq_len=64, batch_size=4, shuffle=False)
    segments = _check_rows(next(iter(_ds(cfg))), 64, 4)
    first = BYTES.decode(segments[0][0])
    ex = synthetic.arithmetic_example(0, int(sources.split_indices(sources.index_range(300, "arithmetic"),
                                                                    "train")[0]))
    assert first == (ex["prompt"] + ex["completion"])[: len(first)]
    assert all(np.all(m[1:] == 1) for _, m in segments)


# ------------------------------------------------------------------------------- determinism and resume


def test_same_config_same_batches():
    cfg = DataConfig(seq_len=64, batch_size=4, seed=5)
    a, b = _take(iter(_ds(cfg)), 6), _take(iter(_ds(cfg)), 6)
    assert _same(a, b)
    assert not _same(a, _take(iter(_ds(DataConfig(seq_len=64, batch_size=4, seed=6))), 6))


def test_same_batches_in_a_fresh_interpreter():
    """No dependence on Python's per-process hash seed or on anything else outside the config."""
    code = ("import hashlib, numpy as np; from dsjax.data import DataConfig, ByteTokenizer, make_dataset; "
            "it = iter(make_dataset(DataConfig(seq_len=64, batch_size=4), ByteTokenizer(), process_index=0, "
            "process_count=1)); h = hashlib.sha256(); "
            "[h.update(np.ascontiguousarray(b[k]).tobytes()) "
            "for b in [next(it) for _ in range(3)] for k in sorted(b)]; "
            "print(h.hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    h = hashlib.sha256()
    it = iter(_ds(DataConfig(seq_len=64, batch_size=4)))
    for b in _take(it, 3):
        for k in sorted(b):
            h.update(np.ascontiguousarray(b[k]).tobytes())
    assert out.stdout.strip() == h.hexdigest()


@pytest.mark.parametrize("cfg", [
    DataConfig(seq_len=32, batch_size=4),
    DataConfig(source="arithmetic", arithmetic_examples=20, seq_len=64, batch_size=2),  # ~17 steps per epoch
    DataConfig(source="arithmetic", arithmetic_examples=20, seq_len=64, batch_size=2, shuffle=False),
    DataConfig(source="sft", paths=("<sft>",), seq_len=128, batch_size=2),
], ids=["default", "arithmetic", "arithmetic-noshuffle", "sft"])
def test_state_json_round_trip_resumes_exactly(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(data.pipeline, "SHUFFLE_WINDOW_ROWS", 32)  # restoring refills the window: keep it cheap
    if cfg.source == "sft":
        cfg = DataConfig(source="sft", paths=(synthetic.write_arithmetic_jsonl(tmp_path / "s.jsonl", 20),),
                         seq_len=128, batch_size=2)  # 8 steps per epoch
    ds = _ds(cfg)
    ref = _take(iter(ds), 50)
    for k in (0, 1, 5, 16, 17, 18, 29, 43):  # mid-epoch, around and after epoch boundaries
        it = iter(ds)
        _take(it, k)
        state = it.get_state()
        restored = json.loads(json.dumps(state))
        assert restored == state
        fresh = iter(_ds(cfg))
        fresh.set_state(restored)
        assert _same(_take(fresh, 6), ref[k:k + 6]), k


def test_finite_epochs_reshuffle_and_stop(jsonl_file):
    cfg = DataConfig(source="jsonl", paths=(jsonl_file,), seq_len=64, batch_size=2, num_epochs=2)
    rows = [BYTES.decode(t) for b in _ds(cfg) for t, _ in _check_rows(b, 64, 2)]
    firsts = [r[:9] for r in rows if r.startswith("doc-")]
    half = len(firsts) // 2
    assert len(set(firsts)) < len(firsts)  # two epochs
    assert firsts[:half] != sorted(firsts[:half]) and firsts[:20] != firsts[half:half + 20]


def test_state_from_another_pipeline_is_refused():
    it = iter(_ds(DataConfig(seq_len=32, batch_size=2)))
    next(it)
    state = it.get_state()
    with pytest.raises(DataError, match="different pipeline.*process_count"):
        _ds(DataConfig(seq_len=32, batch_size=2), pi=0, pc=2).__iter__().set_state(state)
    with pytest.raises(DataError, match="different pipeline.*config"):
        iter(_ds(DataConfig(seq_len=32, batch_size=2, seed=1))).set_state(state)
    with pytest.raises(DataError, match="not a dsjax.data state"):
        iter(_ds(DataConfig(seq_len=32, batch_size=2))).set_state({"next_index": 3})


# ------------------------------------------------------------------------------- sharding, splits, corpus


def _doc_ids(ds):
    """Ids of the documents in an unshuffled stream (rows in order, so no id is cut)."""
    stream = np.concatenate([t for b in ds for t, _ in _check_rows(b, 32, len(b["tokens"]))])
    return set(re.findall(r"doc-(\d{4})", BYTES.decode(stream)))


def test_sharding_gives_disjoint_documents(jsonl_file):
    cfg = DataConfig(source="jsonl", paths=(jsonl_file,), seq_len=32, batch_size=4, num_epochs=1, shuffle=False)
    shards = [_ds(cfg, pi=i, pc=2) for i in range(2)]
    assert next(iter(shards[0]))["tokens"].shape == (2, 32)
    ids0, ids1 = _doc_ids(shards[0]), _doc_ids(shards[1])
    assert ids0 and ids1 and not ids0 & ids1
    assert len(ids0 | ids1) > 0.95 * 396  # all train documents, less what the last partial batch drops
    with pytest.raises(DataError, match="batch_size=5.*3 processes"):
        _ds(DataConfig(batch_size=5), pi=0, pc=3)


def test_valid_and_train_splits_are_disjoint(jsonl_file):
    split = {s: _doc_ids(_ds(DataConfig(source="jsonl", paths=(jsonl_file,), seq_len=32, batch_size=1,
                                        split=s, num_epochs=1, shuffle=False))) for s in ("train", "valid")}
    assert split["valid"] and not split["train"] & split["valid"]
    assert len(split["train"]) + len(split["valid"]) == 400 and len(split["valid"]) < 20
    tiny = sources.index_range(3, "k")
    assert len(sources.split_indices(tiny, "valid")) == 1 and len(sources.split_indices(tiny, "train")) == 2


def test_default_corpus():
    files = data.default_corpus_files()
    assert len(files) > 100 and files == sorted(files) and all(f.endswith(".py") for f in files)
    assert not any(f"{os.sep}{d}{os.sep}" in f for f in files for d in ("test", "site-packages", "idlelib"))
    batch = next(iter(_ds(DataConfig())))
    _check_rows(batch, 256, 8)
    text = BYTES.decode(batch["tokens"])
    assert "\n" in text and "\ufffd" not in text  # Python source, cut at character boundaries


# ------------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_examples_are_deterministic_and_correct():
    assert synthetic._add_steps(47, 85) == "7+5=12, write 2 carry 1. 4+8+1=13, write 13."
    ops = set()
    for i in range(600):
        ex = synthetic.arithmetic_example(7, i)
        assert ex == synthetic.arithmetic_example(7, i)
        m = re.fullmatch(r"Q: (\d+)([-+*])(\d+)=\?\nA: ", ex["prompt"])
        a, op, b = int(m[1]), m[2], int(m[3])
        ops.add(op)
        want = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert ex["answer"] == str(want) == synthetic.parse_answer(ex["completion"])
        assert ex["completion"].startswith("<think>") and ex["completion"].endswith(f"<answer>{want}</answer>")
        assert len(ex["prompt"] + ex["completion"]) <= synthetic.MAX_EXAMPLE_CHARS
        if op in "+-":  # the written digits, last column first, spell the (absolute) result
            written = re.findall(r"write (\d+)", ex["completion"])
            assert int("".join(reversed(written))) == abs(want)
    assert ops == {"+", "-", "*"}
    assert synthetic.arithmetic_example(8, 0) != synthetic.arithmetic_example(7, 0)
    ds = synthetic.arithmetic_dataset(10, seed=7)
    assert len(ds) == 10 and ds[3] == synthetic.arithmetic_example(7, 3)


def test_write_arithmetic_jsonl(tmp_path):
    path = synthetic.write_arithmetic_jsonl(tmp_path / "x" / "a.jsonl", 5, seed=2)
    lines = [json.loads(x) for x in open(path)]
    assert lines == [synthetic.arithmetic_example(2, i) for i in range(5)]


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=1), "seq_len=1: must be an integer > 1"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(source="parquet"), "source='parquet': unknown source"),
    (dict(source="text"), "paths=().*reads files"),
    (dict(source="text", paths="a.txt"), r"write paths=\('a.txt',\)"),
    (dict(paths=("a.txt",)), "reads no files"),
    (dict(split="test"), "split='test'"),
    (dict(num_epochs=0), "num_epochs=0"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**kwargs)


def test_config_accepts_a_list_of_paths():
    assert DataConfig(source="text", paths=["a.txt", "b/*.txt"]).paths == ("a.txt", "b/*.txt")


def test_file_errors(tmp_path, jsonl_file):
    def make(source, *paths, **kw):
        return _ds(DataConfig(source=source, paths=tuple(str(tmp_path / p) for p in paths), **kw))

    with pytest.raises(DataError, match=r"missing/\*\.txt.*matches no files"):
        make("text", "missing/*.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: file is empty"):
        make("text", "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        make("jsonl", "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nofield\.jsonl:1: no field 'text'.*text_field"):
        make("jsonl", "nofield.jsonl")
    with pytest.raises(DataError, match=r"docs\.jsonl:1: no field 'prompt'"):
        make("sft", os.path.basename(jsonl_file))
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object"):
        make("jsonl", "list.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no JSON records"):
        make("jsonl", "blank.jsonl")
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="epoch yields no documents.*split 'train' keeps 0 of 1"):
        make("text", "one.txt")


def test_arithmetic_difficulty_knobs():
    from dsjax.data.synthetic import arithmetic_example

    assert arithmetic_example(3, 7) == arithmetic_example(3, 7, ops="+-*", max_digits=5)  # defaults unchanged
    for i in range(200):
        ex = arithmetic_example(0, i, ops="+-", max_digits=2)
        a, op, b = re.fullmatch(r"Q: (\d+)([+\-])(\d+)=\?\nA: ", ex["prompt"]).groups()
        assert int(a) < 100 and int(b) < 100
        assert int(ex["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    for bad in [dict(ops="/"), dict(ops=""), dict(ops="++"), dict(max_digits=0), dict(max_digits=6)]:
        with pytest.raises(ValueError):
            arithmetic_example(0, 0, **bad)
    with pytest.raises(DataError, match="arithmetic_max_digits"):
        DataConfig(source="arithmetic", arithmetic_max_digits=9)
    cfg = DataConfig(source="arithmetic", arithmetic_ops="+", arithmetic_max_digits=1, seq_len=32, batch_size=2)
    tok = make_tokenizer(cfg)
    text = tok.decode(next(iter(make_dataset(cfg, tok)))["tokens"].reshape(-1).tolist())
    assert "-" not in text and "*" not in text and re.search(r"\d\+\d=", text), text
