"""Training recipes assembled from losses, heads and banks (see DESIGN.md)."""
