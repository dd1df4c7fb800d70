"""The model in a browser: `tegaki export RUN OUT --web` writes a static folder that runs it.

    from tegaki.web import export_web
    export_web("runs/demo", "demo-web")   # then: python -m http.server -d demo-web

- `export.py`        the folder: the page's files, the weights (safetensors: a small JSON header,
                     then the raw tensors), the tokenizer as the page reads it
- `build.py`         `make web`: kernels/kernels.rs -> static/kernels.wasm, and the check that the
                     committed .wasm is the build of today's source
- `kernels/`         the kernels in Rust (matvec, norms, GELU, SiLU, RoPE, attention over a KV cache)
- `static/`          the page: index.html, the forward pass (model.js, mirroring tegaki/model.py),
                     the kernels again in plain JavaScript (kernels.js, the fallback), the
                     tokenizer (tokenizer.js), sampling and the views (app.js)
"""

from __future__ import annotations

from tegaki.web.export import WEB_FILES, export_web, web_refusals, write_web_folder

__all__ = ["export_web", "write_web_folder", "web_refusals", "WEB_FILES"]
