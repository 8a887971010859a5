"""TODO(layout): models."""
