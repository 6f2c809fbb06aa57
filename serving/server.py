"""`jaxllm serve MODEL`: flags (vLLM's names, or a YAML file of them), the engine, uvicorn, graceful stop.

On SIGTERM (or Ctrl-C) the server answers 503 to new requests, lets running ones finish for
`--timeout-graceful-shutdown` seconds, stops the engine and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from jaxllm.engine_config import EngineConfig

logger = logging.getLogger("jaxllm.serve")

_SERVER_FLAGS = {"host", "port", "api_key", "served_model_name", "max_queued_requests", "uvicorn_log_level",
                 "chat_template", "enable_auto_tool_choice", "tool_call_parser", "timeout_graceful_shutdown"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's own flags; the engine's are added from `EngineConfig` by the CLI."""
    parser.add_argument("model", nargs="?", default=None, help="a known name, a Hugging Face directory or a .gguf")
    parser.add_argument("--config", help="a YAML file of flags (dashes or underscores); flags given here win")
    parser.add_argument("--host", default=None, help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default 8000")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 "
                                                        "(also $JAXLLM_API_KEY)")
    parser.add_argument("--served-model-name", nargs="+", default=None, help="names clients use (default: MODEL)")
    parser.add_argument("--max-queued-requests", type=int, default=None, help="beyond this many waiting: 429")
    parser.add_argument("--uvicorn-log-level", default=None, help="default info")
    parser.add_argument("--chat-template", default=None, help="a Jinja template, or a file holding one")
    parser.add_argument("--enable-auto-tool-choice", action="store_true", default=None)
    parser.add_argument("--tool-call-parser", choices=["hermes"], default=None)
    parser.add_argument("--timeout-graceful-shutdown", type=float, default=None,
                        help="seconds running requests get after SIGTERM (default 30)")


def settings(args: argparse.Namespace, engine_fields: list[str]) -> dict[str, Any]:
    """Flags given on the command line over those of `--config`, over the defaults."""
    values = load_config(args.config, engine_fields) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("command", "config")})
    return values


def load_config(path: str, engine_fields: list[str]) -> dict[str, Any]:
    """A `--config` YAML file's settings, keyed by underscored flag names. A `tpu:` section (the metadata of
    the slice configs in tpu_configs/) is checked and left out; any other key must be a flag."""
    import yaml

    from jaxllm.tpu_slices import TpuSection

    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    values = {key.replace("-", "_"): value for key, value in loaded.items()}
    if "tpu" in values:
        try:
            TpuSection.from_yaml(values.pop("tpu"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    unknown = sorted(set(values) - _SERVER_FLAGS - set(engine_fields))
    if unknown:
        raise ValueError(f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                         f"(keys are jaxllm serve flags, or a 'tpu:' section)")
    return values


def build_engine_config(values: dict[str, Any], engine_fields: list[str]) -> EngineConfig:
    """The `EngineConfig` of the merged settings (the model defaults to the default model)."""
    from jaxllm.engine_config import EngineConfig
    from jaxllm.weights.sources import DEFAULT_MODEL

    return EngineConfig(**{k: v for k, v in values.items() if k in engine_fields and k != "model"},
                        model=values.get("model") or DEFAULT_MODEL)


def run(values: dict[str, Any], engine_fields: list[str]) -> None:
    from jaxllm import distributed
    from jaxllm.async_engine import AsyncEngine
    from jaxllm.llm_engine import LLMEngine
    from serving.app import ServerConfig, build_app

    engine_config = build_engine_config(values, engine_fields)
    if not distributed.is_leader():  # process N > 0 of a multi-host engine: no server, process 0's steps
        LLMEngine(engine_config).follow()
        return
    model = engine_config.model
    server_config = ServerConfig(
        served_model_names=list(values.get("served_model_name") or [model]),
        api_key=values.get("api_key") or os.environ.get("JAXLLM_API_KEY"),
        max_queued_requests=values.get("max_queued_requests"),
        chat_template=_template(values.get("chat_template")),
        enable_auto_tool_choice=bool(values.get("enable_auto_tool_choice")),
        tool_call_parser=values.get("tool_call_parser"))
    engine = AsyncEngine.from_config(engine_config)
    host, port = values.get("host") or "127.0.0.1", int(values.get("port") or 8000)
    names = ", ".join(server_config.served_model_names)
    app = build_app(engine, server_config, on_ready=lambda: logger.info(
        "ready: serving %s as %s at http://%s:%d/v1", model, names, host, port))
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_level=values.get("uvicorn_log_level", "info"),
                                           timeout_graceful_shutdown=values.get("timeout_graceful_shutdown", 30)))
    try:
        server.run()
    finally:
        engine.shutdown()


def _template(value: str | None) -> str | None:
    if value and len(value) < 4096 and Path(value).is_file():
        return Path(value).read_text()
    return value


class GracefulServer(uvicorn.Server):
    """Marks the app as shutting down (503 for new requests) as soon as a stop signal arrives, and treats
    the signal as the normal way to stop: after the graceful shutdown the process exits 0 (uvicorn would
    re-raise the signal, so that a service manager sees 143)."""

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.shutting_down = True
        super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()
