"""`lserve serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one LLMEngine.

Modules: `protocol` (request/response bodies), `async_engine` (the engine thread and loop),
`serving` (endpoint logic, streaming), `metrics` (Prometheus), `api_server` (app and server),
`cli_args` (the `serve` subcommand).
"""
