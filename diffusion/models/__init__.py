"""Networks: the shared layers (``layers.py``: embeddings, attention with TMSA, patches), the
U-Net (``unet.py``), DiT (``dit.py``), image-space and latent DiffiT (``diffit.py``), the
noise-aware classifier built from the U-Net's encoder half (``classifier.py``), their
torch-free configs and shape rules by family (``configs.py``) and the name -> constructor
table that ``model.name`` selects (``factory.py``)."""
