"""The machine a run meets: the device and precision it gets (``precision``), decided by what this
machine measurably does (``machine``: whether bf16 pays on its CPU, timed once and remembered)."""
