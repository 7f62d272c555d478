"""alaya_jax."""
