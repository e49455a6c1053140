"""Alembic migrations of the store: ``env.py`` runs them on the connection ``store/schema.py`` hands over,
``versions/`` holds one file per revision (``NNNN_what.py``), numbered in order.

To add a revision: change ``models.py``, run ``executor db revision "what changed"`` from a checkout (it
writes ``versions/NNNN_what_changed.py`` by comparing the models with a database at the current head),
read and trim what it wrote, and set ``schema.HEAD`` to the new number; ``tests/unit/test_migrations.py``
fails until the migrated schema equals the models on SQLite and on PostgreSQL.
"""
