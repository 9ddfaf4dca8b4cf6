"""``python -m minigpt2`` (and ``torchrun -m minigpt2``) runs the CLI."""

from minigpt2.cli import main

raise SystemExit(main())
