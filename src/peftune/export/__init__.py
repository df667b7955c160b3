"""Taking a trained adapter elsewhere: merged into a plain transformers model (merge.py)."""
