"""The only package that touches torch and diffusers: builds a Wan2.2 pipeline from a Recipe, applies its
knobs, runs, times and measures quality. Runs as its own process (``python -m wan_runtime``)."""
