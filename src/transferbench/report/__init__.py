"""Figures and the report (markdown and HTML)."""
