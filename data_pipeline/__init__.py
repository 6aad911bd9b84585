"""Data pipeline: video/image decoding, prompts and tokens, TFDS builders and Grain loaders."""

from data_pipeline.errors import BadSampleError

__all__ = ["BadSampleError"]
