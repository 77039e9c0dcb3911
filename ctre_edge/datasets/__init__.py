"""Data sets shipped with ctre-edge (see SOURCES.md)."""
