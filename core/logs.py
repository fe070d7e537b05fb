"""The log format every command sets up."""

from __future__ import annotations

import sys

from loguru import logger


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log lines go through tqdm.write so they never tear a progress bar."""
    from tqdm import tqdm

    logger.remove()
    level = "DEBUG" if verbose else ("WARNING" if quiet else "INFO")
    logger.add(
        lambda msg: tqdm.write(msg, end="", file=sys.stderr),
        level=level,
        format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}",
        colorize=sys.stderr.isatty(),
    )
