"""The `lserve serve` subcommand: its flags and its entry point.

Kept apart from `lserve.cli` so the CLI gains the subcommand with one call, and so that
FastAPI and uvicorn are imported only when the server actually starts.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from lserve.entrypoints.openai.tools import TOOL_CALL_PARSERS
from lserve.errors import LServeError

API_KEY_ENV = "LSERVE_API_KEY"


def add_serve_parser(
    subparsers: Any,
    add_engine_flags: Callable[[argparse.ArgumentParser], None],
    engine_kwargs: Callable[[argparse.Namespace], dict[str, Any]],
) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers.

    `add_engine_flags` adds one flag per engine field and `engine_kwargs` reads them back (both
    from `lserve.cli`, passed in so this module does not import the CLI).
    """
    p = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve MODEL (default: the embedded SmolLM2-135M-Instruct) with OpenAI's /v1/completions "
                    "and /v1/chat/completions, plus /v1/models, /health, /metrics, /tokenize, /detokenize, /version.",
    )
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face folder or .gguf file (the same as --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use; the first is reported in responses (default: MODEL, "
                        "or the default model's name)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on /v1 endpoints (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="on SIGTERM, seconds open requests may still run before they are aborted (default: 5)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 2**20,
                   help="largest request body accepted; larger ones get 413 (default: 32 MiB)")
    p.add_argument("--max-prompts-per-request", type=int, default=128,
                   help="most sequences (prompts times n or best_of) in one request; more get 400 (default: 128)")
    p.add_argument("--tool-call-parser", default="auto", choices=list(TOOL_CALL_PARSERS),
                   help="how tool calls are written and parsed: hermes (<tool_call> blocks), llama3_json "
                        "(Llama 3.x JSON calls), mistral ([TOOL_CALLS]), or auto: by the model family, hermes "
                        "otherwise (default: auto)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level; 'warning' hides the access log (default: info)")
    add_engine_flags(p)
    p.set_defaults(func=functools.partial(cmd_serve, engine_kwargs=engine_kwargs))
    return p


def cmd_serve(args: argparse.Namespace, engine_kwargs: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Check the server flags, load the model, serve until stopped."""
    kwargs: dict[str, Any] = engine_kwargs(args)
    if args.model_tag is not None:
        if kwargs.get("model") not in (None, args.model_tag):
            raise LServeError(f"two models given: {args.model_tag!r} and --model {kwargs['model']!r}")
        kwargs["model"] = args.model_tag
    if not 0 < args.port < 65536:
        raise LServeError(f"--port must be in 1..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise LServeError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for flag in ("max_request_bytes", "max_prompts_per_request"):
        if getattr(args, flag) < 1:
            raise LServeError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    # the server's progress lines (model, KV cache, URL, periodic stats) show without -v
    logging.getLogger("lserve").setLevel(logging.INFO)
    try:
        from lserve.entrypoints.openai.api_server import serve
    except ImportError as exc:
        raise LServeError(f"the server needs fastapi, uvicorn and prometheus-client: {exc}") from exc
    return serve(kwargs, args.host, args.port, args.served_model_name, api_key, args.shutdown_timeout,
                 args.uvicorn_log_level, max_request_bytes=args.max_request_bytes,
                 max_prompts_per_request=args.max_prompts_per_request, tool_call_parser=args.tool_call_parser)
