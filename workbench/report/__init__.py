"""TODO(layout): report."""
