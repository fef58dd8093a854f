"""Training the network with the paper's recipe (§5): the loop (loop.py: `train(config)`) over one record of where
the run is (position.py), the step (step.py), the training batches in either form (feed.py), the settings and the
update rule (recipe.py) and their flags (flags.py), the checks before step 1 (checks.py), the strategy
(devices.py), the run's folder and checkpoints (checkpoints.py) and its claim on it (claim.py), how a run stops
when asked to (stopping.py), TensorBoard and the console (summaries.py) and the top-k errors (evaluation.py)."""
