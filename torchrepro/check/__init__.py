"""Check layer: ``torchrepro check`` as stages.

``_plan`` (which runs), ``_execute`` (each run's processes and what its trace shows it did),
``_pinpoint`` (re-runs that name the exact step and the module), ``_localize`` (comparing two
captures), ``_explain`` (why: batch and environment), ``_verdict`` (the claim, a pure rule
table), ``_results`` (:class:`CheckReport`), ``_runner`` (:func:`run_check`, the stages in
order), ``_report`` (the HTML page) and ``_process`` (process groups, signals, timeouts).
"""
