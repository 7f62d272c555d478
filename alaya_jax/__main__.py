from alaya_jax.cli import run

run()
