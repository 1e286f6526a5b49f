"""Shared models, tasks, metrics, configuration and synthetic data."""
