"""The rule framework, one module per ``rules/`` module it specifies: results, rules and their
hooks, universal transforms, contexts and null rejects.

A port of Prefect's ``tests/server/orchestration/test_rules.py`` (reference §5.1), with the same
test names so a parity table can map them. These tests run on the in-memory store only (the
package is not under ``tests/unit/core/``, see ``tests/unit/conftest.py``).
"""
