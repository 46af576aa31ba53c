"""Model builders: the CogVideoX transformer (dense half, task embedding), VAE, text encoder, schedulers."""
