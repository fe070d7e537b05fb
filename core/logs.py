"""The log format every command sets up."""

from __future__ import annotations

import sys

from loguru import logger


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log lines go through tqdm.write so they never tear a progress bar."""
    from tqdm import tqdm

    logger.remove()
    # Messages name files anyone may name: a newline would forge a log line, ESC/OSC would reach
    # the terminal of whoever reads the log. Every message is shown escaped (core.names.shown).
    logger.configure(patcher=_escape_message)
    level = "DEBUG" if verbose else ("WARNING" if quiet else "INFO")
    logger.add(
        lambda msg: tqdm.write(msg, end="", file=sys.stderr),
        level=level,
        format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}",
        colorize=sys.stderr.isatty(),
    )


def _escape_message(record) -> None:
    from core.names import shown

    record["message"] = shown(record["message"])
