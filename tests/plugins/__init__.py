"""Pytest plugins: shared fixtures."""
