"""Input pipelines (Grain): tokenizers, document sources, a synthetic arithmetic task and packed batches.

Typical use::

    from dsjax import data
    cfg = data.DataConfig(source="default", seq_len=256, batch_size=8)
    tok = data.make_tokenizer(cfg)
    data.check_vocab(tok, model_cfg.vocab_size)
    it = iter(data.make_dataset(cfg, tok))      # create after restoring a checkpoint, then it.set_state(...)
    batch = next(it)                            # tokens / segment_ids / positions / loss_mask, int32 [b, T]

This package never imports the model; ``tokenizers`` and ``jax`` are imported only when needed.
"""

from dsjax.data.pipeline import SOURCES, DataConfig, make_dataset
from dsjax.data.sources import DataError, default_corpus_files
from dsjax.data.synthetic import arithmetic_dataset, arithmetic_example, parse_answer, write_arithmetic_jsonl
from dsjax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, check_vocab, make_tokenizer

__all__ = [
    "SOURCES",
    "DataConfig",
    "DataError",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "make_tokenizer",
    "check_vocab",
    "make_dataset",
    "default_corpus_files",
    "arithmetic_example",
    "arithmetic_dataset",
    "write_arithmetic_jsonl",
    "parse_answer",
]
