"""Tasks (templates, label words) and their data: loading, k-shot sampling, the client partition, site shards."""
