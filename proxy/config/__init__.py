"""Routing rules: the immutable model, its loader, and (later) the watcher and the store."""
