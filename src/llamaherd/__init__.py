"""llamaherd: a PyTorch-native toolkit for the LLaMA / Llama 2 / Falcon family."""

__version__ = "0.1.0"
