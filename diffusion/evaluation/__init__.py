"""Evaluation: FID and KID on Inception features with their intervals (``metrics.py``), precision, recall,
density and coverage (``fidelity.py``), reference statistics in other formats (``reference_files.py``), the
FID protocol that says how one was measured (``protocol.py``), and on digits whether images are clear digits
and show what their prompts ask (``digit_classifier.py``, ``text_faithfulness.py``)."""
