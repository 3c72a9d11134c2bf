"""Provider SDK integrations behind :func:`llmtally.instrument` (imported lazily)."""
