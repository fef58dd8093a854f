"""The commands, each `python -m tools.NAME`: check (a machine before a long run, with train.py's flags), and those
that use a trained run: evaluate, export, predict, neighbours (Figure 4); with the libraries two of them stand on:
serving.py (the exported signature and its limits) and similarity.py (the fc7 search)."""
