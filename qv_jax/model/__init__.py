"""Model parts: vision tower, compressor (cubing + resampler + thumbnail), decoder, the whole model."""
