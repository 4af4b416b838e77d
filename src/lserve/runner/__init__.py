"""Model runner: builds a step's inputs, runs the model, samples."""
