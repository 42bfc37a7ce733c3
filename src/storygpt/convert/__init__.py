"""Conversion: export to storygpt, transformers, llama2.c, GGUF and ONNX; import from llama2.c and transformers.

- export.py: `export_model`; gguf.py: llama.cpp's GGUF; onnx.py: `export_onnx` and `OnnxStory` (onnx_graph.py:
  the graph); importer.py: `import_model`.
"""

from .export import export_model
from .importer import import_model
from .onnx import OnnxStory, export_onnx

__all__ = ["OnnxStory", "export_model", "export_onnx", "import_model"]
