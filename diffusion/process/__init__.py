"""The diffusion process: beta schedules and respacing, the Gaussian process (q, p, the
parameterisations, losses, the variational bound), its options, and timestep sampling."""
