"""Denoising networks: the U-Net (``unet.py``), their torch-free configs and shape rules
(``configs.py``) and the name -> constructor table that ``model.name`` selects (``table.py``)."""
