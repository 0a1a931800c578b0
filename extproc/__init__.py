"""Prompt-cache accounting for OpenAI-compatible chat completions behind Envoy ext_proc."""

__version__ = "0.1.0"
