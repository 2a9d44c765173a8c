"""inferaligner-onnx: layer-split ONNX export of Llama-family decoders, without torch.

The residual stream between decoder layers is ordinary graph I/O, so the Rust runtime can read
it, gate on it and add steering vectors between segments.
"""

__version__ = "0.1.0"
