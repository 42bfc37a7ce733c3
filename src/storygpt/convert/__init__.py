"""Conversion: export to storygpt, transformers, llama2.c, GGUF and ONNX; import from llama2.c and transformers;
the static web site that runs a model in the browser.

- export.py: `export_model`; gguf.py: llama.cpp's GGUF; onnx.py: `export_onnx` and `OnnxStory` (onnx_graph.py:
  the graph); importer.py: `import_model`;
- web.py: `build_site` and `site_server` (`storygpt web`); web_tokenizer.py: the tokenizer data the page's
  `tokenizer.js` reads (the page itself is in `storygpt/resources/web/`).
"""

from .export import export_model
from .importer import import_model
from .onnx import OnnxStory, export_onnx
from .web import build_site, site_server
from .web_tokenizer import tokenizer_data, write_tokenizer_json

__all__ = ["OnnxStory", "build_site", "export_model", "export_onnx", "import_model", "site_server", "tokenizer_data",
           "write_tokenizer_json"]
