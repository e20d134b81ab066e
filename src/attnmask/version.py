"""The package version (one place; ``attnmask.__version__`` and ``attnmask --version`` read it).

    >>> from attnmask.version import __version__
    >>> __version__.count(".")
    2
"""

__version__ = "0.1.0"
