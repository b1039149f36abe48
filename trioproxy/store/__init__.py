"""The shared store of both planes: schema, engines and migrations, provisioning, snapshots, prices, request
rows.

Everything in this package is blocking SQLAlchemy; async callers run it in ``trio.to_thread.run_sync``.
Importing it connects to nothing.
"""
