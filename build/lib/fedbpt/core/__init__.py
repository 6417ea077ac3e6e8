"""The NVFlare-free core: tasks, data, scorers, search, aggregation, wire format and round logic."""
