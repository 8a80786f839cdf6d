"""Arbiter's orchestration core: contexts, rules, policies. Pure: no broker, no SQL."""
