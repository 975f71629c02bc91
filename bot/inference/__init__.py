"""Where replies are generated: the `Backend` seam (backend.py), the local model run
through transformers (local.py and its parts) and an OpenAI-compatible server
(served.py)."""
