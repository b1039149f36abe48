"""trioproxy: a self-hosted AI API gateway on Trio.

The data plane (this package) serves OpenAI, Anthropic and Gemini clients on :8080; the control plane lives in
the sibling ``admin`` package. Importing this package has no side effects.
"""

__version__ = "0.1.0"
