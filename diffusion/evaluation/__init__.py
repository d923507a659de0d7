"""Evaluation: FID and KID on Inception features (``metrics.py``) and the FID protocol that says how one was measured (``protocol.py``)."""
