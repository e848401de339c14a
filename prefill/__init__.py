"""Prefill role (disaggregated serving; see DESIGN.md)."""
