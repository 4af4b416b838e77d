"""Engine: scheduler, core step loop, LLMEngine (tokens <-> text) and the offline LLM API."""
