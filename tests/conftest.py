"""Shared fixtures live in plugins; this file only registers them."""

pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.stack",
    "tests.plugins.tokenizer",
]
