"""Analysis: find a model's layers, decompose their weights (plain or data-aware) and choose ranks."""
