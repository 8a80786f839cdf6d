"""Prefect's core policy rules, one module per rule family."""
