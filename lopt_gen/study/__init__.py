"""Small, self-contained studies for comparing optimizers (hand-written or generated)."""
