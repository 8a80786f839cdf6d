"""The rule framework, by concern of the ``rules/`` module it specifies: results, rules and
their hooks, null rejects, universal transforms, how a context may change and how it validates.

A port of Prefect's ``tests/server/orchestration/test_rules.py`` (reference §5.1), with the same
test names so a parity table can map them. These tests run on the in-memory store only (the
package is not under ``tests/unit/core/``, see ``tests/unit/conftest.py``).
"""
