"""The store's contract on PostgreSQL: the unit tier's store tests (SQLite, no server) collected again here with
``db_url``/``empty_db_url`` giving databases of a real PostgreSQL 15 cluster (tests/postgres.py), plus what only
PostgreSQL has (LISTEN/NOTIFY)."""
