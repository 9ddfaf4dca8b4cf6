"""``python -m minigpt2`` (and ``torchrun -m minigpt2``) runs the CLI."""

from minigpt2.cli import run

raise SystemExit(run())
