"""The NVFlare-free core, shipped in every job: configuration, wire format and the roles below them."""
