"""Sampling: the samplers of the reverse process, their table of names and costs
(torch-free), per-image noise, and the :func:`~diffusion.sampling.sample.sample` front door."""
