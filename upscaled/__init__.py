"""upscaled: 4x neural super-resolution as a hot-folder service.

This package is the top layer, the commands: the CLI (`cli`), the one-shot `upscale` and the
`models` commands. What they run lives below (docs/architecture.md).
"""

from core import __version__  # noqa: F401 - upscaled.__version__, as before
