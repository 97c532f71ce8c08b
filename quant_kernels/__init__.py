"""GPTQ weight format, quantized linear layers, their compute backends and the quantizer."""
