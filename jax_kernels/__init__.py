"""Pure-JAX event-based simulation kernels for spiking neural networks (never imports torch)."""
