"""Checkpoint layer: bitwise resume through ``state_dict``/``load_state_dict`` alone.

``_io`` is the policy (what a checkpoint holds, how ranks agree, the order of checks on
load), ``_file`` owns the file format (header, checksum, atomic write, streaming read), and
``_checkpointer`` is the few-lines :class:`~torchrepro.Checkpointer` with ``check``'s stop.
Knows no loader and no trace: both are objects with a ``state_dict``.
"""
