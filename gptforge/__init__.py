"""gptforge: train GPT-style language models from scratch, from raw text to samples."""

__version__ = "0.1.0"
