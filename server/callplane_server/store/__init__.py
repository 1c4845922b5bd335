"""The store: SQLAlchemy models, repositories and the query compiler. The only package with SQL and the
only one that knows which database is in use."""

from callplane_server.store.store import Store, Transaction

__all__ = ["Store", "Transaction"]
