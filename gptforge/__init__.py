"""gptforge: train GPT-style language models from scratch, from raw text to samples.

The public API is imported lazily, so `gptforge --help` does not pay for importing torch:

    from gptforge import GPT, GPTConfig, load_checkpoint, generate
"""

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "gptforge.model",
    "GPTConfig": "gptforge.config",
    "RunConfig": "gptforge.config",
    "load_checkpoint": "gptforge.modelio.load",
    "generate": "gptforge.infer.engine",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
