"""The commands that use a trained run, each `python -m tools.NAME`: evaluate, export, predict, neighbours (Figure 4);
with the libraries two of them stand on: serving.py (the exported signature) and similarity.py (the fc7 search)."""
