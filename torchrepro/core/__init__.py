"""Core layer: seeds, RNG capture and restore, the determinism switch, env vars, distributed facts.

No I/O beyond environment variables; imports nothing else of torchrepro but ``_errors`` and
``_version``. Modules: ``_seed`` (seed derivation and ``seed_everything``), ``_rng``
(``get_rng_state``/``set_rng_state``), ``_determinism`` (``deterministic``), ``_envvars``
(every ``TORCHREPRO_*`` variable), ``_dist`` (torch.distributed facts and the store
exchange), ``_statedict`` (versioned state dicts), ``_runinfo`` (what a run observed about
itself, for the trace header), ``_compiled`` (torch.compile: the wrapped module, how it is
compiled, Inductor's settings, read without importing Inductor).
"""
