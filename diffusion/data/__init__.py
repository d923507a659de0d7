"""Data: image sources by name (``sources.py``) and the dataset files with their manifest (``dataset.py``)."""
