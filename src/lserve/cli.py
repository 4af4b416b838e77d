"""`lserve` command line: generate, chat, serve, eval, bench, calibrate.

Engine flags are generated from the config dataclasses (`lserve.config`), so every `LLM(...)`
argument is a flag with the same name and help, and none can drift. Errors caused by input
print one line and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lserve.config import GROUPS, EngineConfig, engine_fields
from lserve.entrypoints.openai.cli_args import add_serve_parser
from lserve.errors import LServeError

EXIT_USAGE = 2
EXIT_ERROR = 1


def _flag_type(annotation: Any) -> tuple[Callable[[str], Any] | None, list[Any] | None]:
    """(converter, choices) for a field's type; Optional[...] is unwrapped."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _flag_type(inner[0])
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(args)
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def add_engine_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per engine field: `--page-size`, `--streaming-sparsity`, ..."""
    hints: dict[str, Any] = {}
    for cls in (*GROUPS.values(), EngineConfig):
        hints.update(typing.get_type_hints(cls))
    group = parser.add_argument_group("engine options (the same names as LLM(...) arguments)")
    for _, f in engine_fields():
        if f.name in skip:
            continue
        default = f.default
        if hints[f.name] in (bool, bool | None):
            group.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=f.metadata.get("help", "") + f" (default: {default})",
            )
            continue
        conv, choices = _flag_type(hints[f.name])
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=conv, choices=choices,
            default=argparse.SUPPRESS, help=help_text,
        )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the engine flags the user gave; the config supplies the rest."""
    names = {f.name for _, f in engine_fields()}
    return {k: v for k, v in vars(args).items() if k in names}


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace) -> Any:
    from lserve.sampling_params import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, stop=args.stop,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lserve", description="Long-context LLM serving with block-sparse attention")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_parser(sub, add_engine_flags, engine_kwargs)

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling_flags(gen)
    add_engine_flags(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="system message")
    _add_sampling_flags(chat)
    add_engine_flags(chat)
    chat.set_defaults(func=cmd_chat)

    from lserve.bench.command import add_bench_parser
    from lserve.calibration.cli import add_calibrate_parser
    from lserve.eval.command import add_eval_parser

    add_eval_parser(sub, add_engine_flags)
    add_bench_parser(sub, add_engine_flags)
    add_calibrate_parser(sub)
    return parser


def _load_llm(args: argparse.Namespace) -> Any:
    from lserve.engine.llm import LLM

    return LLM(**engine_kwargs(args))


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt_file is not None:
        try:
            prompt = args.prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise LServeError(f"cannot read --prompt-file {args.prompt_file}: {exc}") from exc
    else:
        prompt = args.prompt
    params = _sampling_params(args)
    llm = _load_llm(args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)
    else:
        out = llm.generate(prompt, params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _load_llm(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Chat with the model. Empty line or Ctrl-D to quit; /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        except LServeError as exc:  # e.g. the conversation outgrew max_model_len
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        print(reply)
        history.append({"role": "assistant", "content": reply})
    return 0


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from lserve import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        _quiet_libraries(args.verbose)
        return int(args.func(args))
    except (LServeError, ValueError, TypeError) as exc:
        print(f"lserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
