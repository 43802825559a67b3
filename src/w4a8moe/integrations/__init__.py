"""Integrations with serving engines (each imports its engine only inside its own package)."""
