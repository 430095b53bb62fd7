"""Folders GeRe writes: which folders are its caches, atomic checksummed I/O, the base-state cache,
the 2-bit / trit label packing."""
