"""attnmask: describe an attention mask, see it, measure it, run attention with it.

The pipeline::

    parse(text) -> Mask -> Mask.compile(shape) -> BlockLayout -> attention / render / analyze

    >>> import attnmask as am
    >>> m = am.causal & (am.sliding(256) | am.sink(4))
    >>> m == am.parse("causal & (sliding(256) | sink(4))")
    True
"""

from __future__ import annotations

from .errors import DenseTooLargeError, LayoutTooLargeError, MaskError, MaskSyntaxError, MaskValueError
from .language import parse
from .layout import BlockLayout, cache_info, clear_cache, set_cache_limit
from .plan import MaskPlan
# render.py imports matplotlib only inside its functions; importing the function
# eagerly keeps `am.render` the function even after `import attnmask.render`.
from .render import SIGNATURE, render
from .masks import Mask
from .maskmod import MaskModWarning, from_mask_mod
from .primitives import (band, causal, chunked, cols, diagonal, dilated, document, full, none, prefix_lm, rows,
                         sink, sliding, strided, window2d)
from .version import __version__
# The flex engine provides Mask.mask_mod and BlockLayout.to_flex_block_mask (see attnmask/late.py);
# it imports FlexAttention itself only when used.
from .engines import flex as _flex  # noqa: F401


def __getattr__(name):
    # Heavier parts load on first use, so `import attnmask` stays light.
    if name in ("attention", "per_batch", "PerBatch"):
        from . import engines
        return getattr(engines, name)
    if name in ("coverage", "fit", "plan_coverage"):
        from . import fitting
        return getattr(fitting, name)
    if name in ("render_weights", "render_overview", "render_census", "render_plan", "head_census"):
        from . import weights
        return getattr(weights, name)
    if name in ("analyze", "AnalysisReport", "plot_analysis"):
        from . import analysis
        return getattr(analysis, name)
    raise AttributeError(f"module 'attnmask' has no attribute {name!r}")


__all__ = ["Mask", "BlockLayout", "MaskPlan", "MaskError", "MaskSyntaxError", "MaskValueError", "DenseTooLargeError",
           "LayoutTooLargeError",
           "parse", "clear_cache", "set_cache_limit", "cache_info", "from_mask_mod", "MaskModWarning", "full", "none",
           "causal", "diagonal", "band", "sliding",
           "sink", "prefix_lm", "chunked", "dilated", "strided", "document", "rows", "cols", "window2d", "attention",
           "per_batch", "PerBatch",
           "render", "analyze", "plot_analysis", "SIGNATURE", "coverage", "fit", "plan_coverage",
           "render_weights", "render_overview", "render_census", "render_plan", "head_census"]
