"""Hugging Face hub checkpoints: the name map (:mod:`dsjax.hf.mapping`) and safetensors I/O (:mod:`dsjax.hf.io`)."""

from dsjax.hf.io import CheckpointError, checkpoint_files, load_hf, save_hf

__all__ = ["CheckpointError", "checkpoint_files", "load_hf", "save_hf"]
