"""Trainer: frozen backbones, light heads, datasets, losses and metrics (torch lives here)."""
