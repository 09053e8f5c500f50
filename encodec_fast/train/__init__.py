"""Training pieces: the multi-scale STFT discriminator (more to come: losses, balancer, loop)."""

from .msstftd import DiscriminatorSTFT, MultiScaleSTFTDiscriminator  # noqa: F401
