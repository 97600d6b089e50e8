"""Recipes into packages: build_recipes."""
