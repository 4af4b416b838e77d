"""Speed tools behind `lserve bench`: offline engine timing (dense vs sparse configurations side by
side, with ratios) in `offline`, and an OpenAI-server load generator with vLLM's metrics in `serve`."""
