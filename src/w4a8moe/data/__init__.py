"""Text that ships inside installed packages, split for training, calibration and evaluation."""

from w4a8moe.data.corpus import CORPUS_SPLITS, ByteTokenizer, load_text, load_user_text, token_batches

__all__ = ["CORPUS_SPLITS", "ByteTokenizer", "load_text", "load_user_text", "token_batches"]
