"""On-disk formats and safe I/O: what minigpt2 writes and how it reads back what users hand it.

- ``fileio``: atomic writes (one rule for every write), publishing a folder by renames, the safe
  reading of a user's file, and tidying after a crash;
- ``checkpoint``: the checkpoint format (safetensors weights, JSON description, resume state);
- ``outdirs``: what a folder is (run, checkpoint, data, export) and where a command may write.
"""
