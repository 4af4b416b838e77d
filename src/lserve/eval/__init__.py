"""Long-context accuracy tools behind `lserve eval`: passkey, needle in a haystack, RULER-style tasks.

Data is generated offline and deterministically (seeded); prompt lengths are counted in the
model's own tokens; scoring is exact. `lserve.eval.runner` runs samples through engine
configurations or OpenAI-compatible servers; `lserve.eval.report` makes the table, JSON and plots.
"""
