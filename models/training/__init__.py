"""A training run: the Lightning module, the recipe, and what runs beside the optimiser (averaging, stopping)."""
