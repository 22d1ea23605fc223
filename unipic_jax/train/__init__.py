"""Training: losses (losses.py), optimiser and EMA (optim.py), grain data (data.py), the loop (loop.py)."""
