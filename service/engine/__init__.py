"""The engine: requests in, characters out. A scheduler steps every running generation of a model as one
batch (scheduler.py) over the recurrent state (batch.py), with a cache of prompt states (prompt_cache.py)
and a C kernel for the LSTM step (kernel.py, kernels/). It imports nothing of Flask, Werkzeug or Gunicorn:
the HTTP layer (charrnn.service.http), the batch command and the Python API are adapters over it."""
