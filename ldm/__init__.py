"""Latent diffusion research framework: KL autoencoder + text-conditioned UNet on Lightning and Hydra."""

__version__ = "0.1.0"
