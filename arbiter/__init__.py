"""Arbiter, installed under one name.

The source tree is organised by three folders, ``worker/`` (I/O: broker, database, CLI),
``rules/`` (the orchestration rules, pure) and ``schemas/`` (wire and domain models). They are
imported as ``arbiter.worker``, ``arbiter.rules`` and ``arbiter.schemas``: in a checkout through
the links in this folder, in the wheel through ``package-dir`` in ``pyproject.toml``. So an
installed Arbiter adds one top-level name to site-packages, and no generic ``worker`` to shadow
or be shadowed by.

The public API for executors: ``arbiter.worker.client.ArbiterClient`` and the wire models in
``arbiter.schemas`` (the contract itself: ``docs/protocol.md``).
"""
