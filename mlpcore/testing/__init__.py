"""Test-only machinery: the fault switch (:mod:`~mlpcore.testing.faults`). Never used by a real run."""
