"""Measuring and recovering accuracy: perplexity / agreement, fake quantization, LKD, range plots."""
