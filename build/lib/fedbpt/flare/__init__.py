"""NVFlare glue: the controller, the executor and FedBPTRecipe."""
