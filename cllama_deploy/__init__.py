"""cllama-deploy: from a LLaMA checkpoint and LoRA adapters to a quantized GGUF served on a laptop."""

__version__ = "0.1.0"
