"""Conversion: export to storygpt, transformers, llama2.c and GGUF; import from llama2.c and transformers.

- export.py: `export_model`; gguf.py: llama.cpp's GGUF; importer.py: `import_model`.
"""

from .export import export_model
from .importer import import_model

__all__ = ["export_model", "import_model"]
