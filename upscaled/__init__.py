"""upscaled: 4x neural super-resolution as a hot-folder service."""

__version__ = "0.1.0"
