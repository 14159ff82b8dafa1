"""radnode job table: SQLAlchemy models, session factory, migrations (SQLite or PostgreSQL)."""
