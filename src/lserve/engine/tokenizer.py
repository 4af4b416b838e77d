"""Tokenizers from transformers, and incremental detokenization with stop strings.

A GGUF file's tokenizer is rebuilt from its metadata by transformers (a few seconds), then saved
under the lserve cache folder so later starts load it at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from lserve.errors import InvalidPromptError, ModelLoadError, RequestRejected
from lserve.model.loader import ModelSource, cache_home, tokenizer_dir_for

logger = logging.getLogger(__name__)


def load_tokenizer(source: ModelSource) -> Any | None:
    """The source's tokenizer, or None when it has none (dummy models without tokenizer files)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    if source.load_format == "gguf":
        return _gguf_tokenizer(source, AutoTokenizer)
    folder = tokenizer_dir_for(source)
    if folder is None:
        if source.load_format == "dummy":
            return None
        raise ModelLoadError(f"no tokenizer files (tokenizer.json / tokenizer.model) in {source.path}")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def _gguf_tokenizer(source: ModelSource, auto: Any) -> Any:
    stat = source.path.stat()
    key = hashlib.sha256(f"{source.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_home() / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        try:
            return auto.from_pretrained(str(cached))
        except Exception:  # noqa: BLE001 (a damaged cache entry is rebuilt below)
            logger.warning("rebuilding the damaged tokenizer cache in %s", cached)
    try:
        tok = auto.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot build a tokenizer from the GGUF metadata of {source.path}: {exc}") from exc
    try:
        tok.save_pretrained(str(cached))
    except OSError as exc:
        logger.warning("could not cache the tokenizer in %s: %s", cached, exc)
    return tok


Prompt = str | list[int] | dict[str, Any]
"""A string, a list of token ids, or vLLM's dict forms: {"prompt": str} / {"prompt_token_ids": [...]}."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str) -> None:
    """InvalidPromptError if `text` cannot be encoded as UTF-8: a lone surrogate, which JSON's
    `\\ud800` escapes and Python strings allow, makes the tokenizer fail with a TypeError."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise InvalidPromptError(f"the prompt is not valid Unicode text: a lone surrogate "
                                 f"(U+{ord(bad.group()):04X}) at character {bad.start()}")


def prompt_text(prompt: Prompt) -> str | None:
    """The text of a prompt given as text (a string or vLLM's {"prompt": ...}); None for token ids."""
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    return text if isinstance(text, str) else None


def encode_prompt(tokenizer: Any | None, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
    """A prompt's token ids: text through `tokenizer`, a list of ids as it is (checked to be ints)."""
    if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt
        keys = set(prompt)
        if keys == {"prompt_token_ids"}:
            prompt = prompt["prompt_token_ids"]
        elif keys == {"prompt"}:
            prompt = prompt["prompt"]
        else:
            raise RequestRejected(f"a prompt dict takes 'prompt' or 'prompt_token_ids' alone, got {sorted(keys)}")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestRejected("this model has no tokenizer; pass prompts as lists of token ids")
        check_text(prompt)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise RequestRejected("a prompt must be a string, a list of integer token ids, or a dict with "
                              "'prompt' or 'prompt_token_ids'")
    return list(prompt)


def render_chat(tokenizer: Any | None, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None) -> str:
    """Messages (and tools, for a template that renders them) as text by the chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestRejected("this model's tokenizer has no chat template")
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools))


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of the vocabulary decodes to (special tokens included)."""
    vocab = tokenizer.get_vocab()
    return max((len(tokenizer.convert_tokens_to_string([t])) for t in vocab), default=1)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas; finds stop strings.

    The last few prompt tokens are decoded along with the output so that tokenizers which drop
    a leading space at the start of a sequence produce the same text as a full decode.
    """

    tokenizer: Any
    context_ids: list[int]
    stop_strings: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    include_stop_str: bool = False
    """Keep a stop string that ends the text in it."""
    text: str = ""
    stop_reason: str | None = None
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def __post_init__(self) -> None:
        self._ids = list(self.context_ids[-5:])
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int], final: bool = False, check_stops: bool = True) -> bool:
        """Append new output ids; returns True when a stop string ended the text (looked for only
        with `check_stops`: a request below its `min_tokens` is not stopped by one)."""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._append(full[len(prefix) :], check_stops)
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self.stop_reason is not None

    def _append(self, delta: str, check_stops: bool = True) -> None:
        old_len = len(self.text)
        self.text += delta
        if not self.stop_strings or not check_stops:
            return
        window_start = max(0, old_len - max(len(s) for s in self.stop_strings) + 1)
        hits = [(self.text.find(s, window_start), s) for s in self.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            idx, stop = min(hits)
            self.text = self.text[: idx + (len(stop) if self.include_stop_str else 0)]
            self.stop_reason = stop
