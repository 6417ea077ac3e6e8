"""The frozen LM as a black box: model names and folders, and the scorers that return label-word losses."""
