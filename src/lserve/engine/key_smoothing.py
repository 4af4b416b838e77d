"""Key smoothing for an FP8 KV cache: the start-up prompt that measures each head's mean key.

An FP8 cache stores each key minus its layer and KV head's shift (`kv_cache.fp8`): softmax
ignores a shift shared by every key, and keys carry a large constant part in a few channels that
E4M3 would otherwise round at 1/16 of its size. The attention backend takes the shift from the
first prefill step it runs after start-up (`AttentionBackend.measure_key_shift`): the mean of
that step's keys, layer by layer, set before they are written. The engine makes that step a
fixed English text (below, tokenized by the model's tokenizer), so the shift depends on the
model alone, never on the first user's prompt; every tensor-parallel rank measures its own heads
in the same step.
"""

from __future__ import annotations

from typing import Any

SMOOTHING_TEXT = """\
The river town woke slowly on market days. Before the sun cleared the hills, the bakers had
already lit their ovens, and the smell of bread drifted down the narrow streets toward the docks,
where fishermen sorted the night's catch into wooden crates. A schoolteacher crossed the square
with a stack of corrected essays under her arm, stopping to ask the clockmaker whether the tower
clock had been fixed at last. It had not; the gears needed a part that would arrive by train on
Thursday, if the bridge repairs upstream were finished in time.

In the library, a student was reading about the history of measurement. Long before metres and
seconds were defined by physical constants, merchants compared lengths against iron bars kept in
town halls, and disputes over a short measure of cloth could end up in court. Standard weights
travelled between cities in sealed boxes. The book explained how astronomers timed the transits
of stars to set clocks, how sailors estimated longitude with chronometers, and why a single
agreed unit saves more arguments than any number of careful inspectors.

Meanwhile, a software engineer in the office above the pharmacy was tracing a bug in a program
that scheduled deliveries. The program assigned each truck a route, but on days with more than
forty orders it sent two trucks to the same street and none to the harbour. She wrote a small
test that reproduced the fault, printed the list of assignments, and noticed that the sorting
step compared addresses as text, so that number 10 came before number 9. The fix took one line;
the test, which she kept, took twenty.

By noon the market was crowded. Farmers sold apples, cheese, honey and wool; a man repaired
bicycles under a striped awning; children counted coins to buy paper kites. Prices were written
in chalk on small boards, and changed when the clouds looked like rain. Someone played a violin
near the fountain, badly at first and then better, as if the tune were being remembered one bar
at a time.

Questions asked that afternoon included: how many kilometres is it to the coast, what time does
the last ferry leave, whether the museum is open on Mondays, and who won the chess tournament in
1987. The answers were 42, a quarter past six, only in summer, and a retired pharmacist named
Elena Ruiz, who still plays every Sunday and rarely loses.
"""

SMOOTHING_TOKENS = 512
"""At most this many tokens of the text (the shift is a mean: a few hundred keys settle it)."""


def smoothing_prompt(tokenizer: Any | None, vocab_size: int, limit: int) -> list[int]:
    """The token ids of the start-up prompt: the text in the model's tokenizer, at most
    min(`SMOOTHING_TOKENS`, `limit`) of them. A model without a tokenizer (dummy weights) gets
    a fixed spread of ids over its vocabulary instead."""
    n = max(1, min(SMOOTHING_TOKENS, limit))
    if tokenizer is None:
        return [(7919 * i + 13) % vocab_size for i in range(n)]
    return list(tokenizer.encode(SMOOTHING_TEXT))[:n]
