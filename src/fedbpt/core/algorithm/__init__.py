"""FedBPT's search: the local CMA-ES with Eq. 7, the server CMA-ES that aggregates it, and the baselines."""
