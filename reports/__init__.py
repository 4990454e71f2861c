"""Markdown reports and plots of a tuning study. No torch at import time (matplotlib is imported lazily)."""
