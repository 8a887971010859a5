"""TODO(layout): analysis."""
