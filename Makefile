# The two commands of the README. Both set everything up first (scripts/setup.sh, idempotent).
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup run test

setup:
	@scripts/setup.sh

run: setup
	.venv/bin/lserve generate --chat --prompt "$(PROMPT)"

test: setup
	.venv/bin/python -m pytest -q
