"""PyTorch front end for exact-gradient spiking neural networks."""
