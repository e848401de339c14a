"""KV transfer: the only code that moves KV bytes between processes (see DESIGN.md)."""
