"""attnmask meets real models: load a transformers model, capture its heads' attention,
run it with attnmask masks (see PRODUCT.md, "Real models").

Needs the extra: ``pip install "attnmask[models]"`` (transformers, gguf, accelerate).
``import attnmask`` never imports this package; importing it imports transformers.
"""

from __future__ import annotations

from .attention import apply, plan_of, register
from .cache import MaskCache, cache_bytes
from .capture import capture, model_shape
from .evaluate import EvalReport, evaluate
from .loading import load, smollm2_path

__all__ = ["load", "smollm2_path", "capture", "model_shape", "apply", "plan_of", "register", "MaskCache",
           "cache_bytes", "evaluate", "EvalReport"]
