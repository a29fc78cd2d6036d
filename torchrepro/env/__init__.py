"""Environment layer: the fingerprint of a machine and software stack, and the diff of two.

``_fingerprint`` reads ``/proc/cpuinfo``, package metadata and ``git`` (which is why it is
not core); ``_diff`` compares two fingerprints and says which differences change results.
"""
