"""minift: a from-scratch fine-tuning framework you can read top to bottom."""
