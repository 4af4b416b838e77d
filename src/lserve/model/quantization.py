"""Load-time weight quantization (`quantization="fp8"`).

A checkpoint in bfloat16, float16 or float32 (or a GGUF file, dequantized as it is read) is loaded
as usual; then every linear layer of the decoder (`layers.Linear`: q/k/v, output, gate/up, down)
has its weight replaced by E4M3 values and a float32 scale per output channel
(`ops.fp8_linear`), which halves the bytes a decode step reads from bfloat16. The token
embedding and the LM head keep the model's dtype: the embedding is read a row at a time, and the
LM head's logits decide every sampled token (in FP8 it alone cost perplexity on both embedded
models: docs/accuracy.md).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lserve.model.layers import Linear
from lserve.ops.fp8_linear import can_quantize

logger = logging.getLogger(__name__)


def quantize_model(model: nn.Module, out_dtype: torch.dtype, device: torch.device, dtype: torch.dtype) -> int:
    """Quantize the model's decoder linear layers to FP8 in place; returns how many were quantized.
    `out_dtype`: what `torch._scaled_mm` writes on `device` (`ops.fp8_linear.check_fp8_matmul`,
    which the caller runs before loading, so that a device without FP8 products fails early)."""
    done, kept = 0, []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, Linear):
                continue
            if can_quantize(module.weight):
                module.quantize_fp8_(out_dtype)
                done += 1
            else:
                kept.append(f"{name} {tuple(module.weight.shape)}")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the model-dtype weights' memory goes back to the KV cache's share
    if kept:
        logger.warning("fp8: %d linear layers kept in %s (a size is not a multiple of 16): %s",
                       len(kept), dtype, ", ".join(kept[:4]) + (" ..." if len(kept) > 4 else ""))
    logger.info("fp8: %d linear layers quantized to E4M3 (a scale per output channel)", done)
    return done
