"""TODO(layout): sweep."""
