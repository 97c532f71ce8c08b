"""talis: run GPTQ-quantized LLaMA-family models from a terminal."""

__version__ = "0.1.0"
