"""TODO(layout): viz."""
