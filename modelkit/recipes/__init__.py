"""Recipes: modelkit on existing engines (optional extras; nothing in the core imports them)."""
