"""Distilling a draft model for a large one: prompts, corpus generation, training, evaluation."""
