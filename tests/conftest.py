"""Shared fixtures live in plugins; this file only registers them."""

pytest_plugins = [
    "tests.plugins.grpc_server",
    "tests.plugins.postgres",
    "tests.plugins.stack",
    "tests.plugins.tokenizer",
]
