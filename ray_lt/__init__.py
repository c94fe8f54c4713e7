"""ray_lt: balance long-tailed image data sets with classifier-guided diffusion samples, and
train and tune the classifier on the mix, on Ray."""

__version__ = "0.1.0"
