"""Alembic migrations of the trioproxy schema; shipped as a package so they run from any working directory."""
