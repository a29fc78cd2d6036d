"""Trace layer: what a run did, step by step, and the comparison of two runs.

``_checksum`` (exact, order-sensitive tensor checksums), ``_trace`` (:class:`~torchrepro.Trace`),
``_file`` (owns the trace format: writes, reads, versions), ``_compare``
(:func:`~torchrepro.compare_traces`), ``_capture`` (one step's per-module checksums and its
file, for localization) and ``_audit`` (:func:`~torchrepro.audit`, which a capture runs in
the training process).
"""
