"""User-facing tools: the ``streamgraph`` command (``tools.cli``) and benchmark (tools.bench)."""
