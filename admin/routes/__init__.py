"""Route modules of the admin API: each exposes ``bp``, a Blueprint registered by :mod:`admin.app`."""
