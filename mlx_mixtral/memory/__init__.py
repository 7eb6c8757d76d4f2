"""Memory: what this machine gives a model (budget.py) and how a model fits in it (plan.py)."""
