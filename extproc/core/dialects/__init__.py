"""Request dialects: where each API keeps its blocks, markers and stream options."""
