"""Event-based JAX kernels of exact-gradient spiking networks (never imports torch; on CPU the
theta layer's scan runs in a C++ kernel through ``jax.ffi``, see :mod:`jax_kernels.native`)."""

# The models first: jax_kernels.models.theta uses jax_kernels.simulate, which uses
# jax_kernels.models.base. Loading the models package before anything else lets every module of
# the package be imported first, in any order.
import jax_kernels.models  # noqa: F401  (import order, see above)
