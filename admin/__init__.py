"""The control plane: the admin API on :9090 (Quart-Trio, served by hypercorn's trio worker).

Entry points: :func:`admin.state.build_state` (what the app runs on), :func:`admin.app.create_app` (the app) and
:func:`admin.serve.serve_admin` (serving it inside the caller's nursery). The admin plane imports the shared store
(``trioproxy.store``); the data plane never imports it.
"""
