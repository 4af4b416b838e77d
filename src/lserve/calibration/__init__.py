"""Calibration of streaming-head patterns (`lserve calibrate`): DuoAttention-style gate optimisation.

`data` makes multi-passkey samples, `gated` the dense / streaming / gated attention callables the
model is handed, `train` the optimisation loop and the output folder, `cli` the subcommand.
"""
