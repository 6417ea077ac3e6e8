"""A site's side of a run without NVFlare: its settings, its set-up cache and its work each round."""
