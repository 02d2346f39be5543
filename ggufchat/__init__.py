"""ggufchat: run quantized GGUF language models on llama.cpp."""

__version__ = "0.1.0"
