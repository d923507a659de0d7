"""Networks: the U-Net (``unet.py``), the noise-aware classifier built from its encoder half
(``classifier.py``), their torch-free configs and shape rules (``configs.py``) and the
name -> constructor table that ``model.name`` selects (``table.py``)."""
