"""jaxllm's own log handler, as vLLM has: INFO lines on stderr unless `JAXLLM_LOGGING_LEVEL` says otherwise."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """Give the `jaxllm` logger a stderr handler once (the root logger is left to the application)."""
    logger = logging.getLogger("jaxllm")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("JAXLLM_LOGGING_LEVEL", "INFO").upper())
    logger.propagate = False
