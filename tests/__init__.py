"""The extproc test suite."""
