"""The colocated engine: scheduler + model runner in one process (the baseline)."""
