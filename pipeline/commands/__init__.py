"""Sub-command groups of the ``distill`` CLI, one module each (discovered by ``pipeline.cli``)."""
