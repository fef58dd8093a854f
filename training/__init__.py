"""Training the network with the paper's recipe (§5): the loop (loop.py: `train(config)`), its settings and update
rule (recipe.py), the checks before step 1 (checks.py), the strategy it runs under (devices.py), the run's folder
and checkpoints (checkpoints.py), TensorBoard and the console (summaries.py) and the top-k errors (evaluation.py)."""
