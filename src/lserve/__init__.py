"""lserve: a serving engine for long-context LLMs with unified block-sparse attention."""

from lserve.config import EngineConfig
from lserve.engine.llm import LLM
from lserve.errors import LServeError, NotSupportedError, RequestRejected
from lserve.request import CompletionOutput, RequestOutput
from lserve.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LServeError",
    "NotSupportedError",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
]
