"""Training pieces: the multi-scale STFT discriminator, the losses and the loss balancer (the
training loop is still to come)."""

from .balancer import Balancer  # noqa: F401
from .losses import (MultiScaleMelLoss, discriminator_hinge_loss, generator_hinge_loss,  # noqa: F401
                     relative_feature_matching, time_l1)
from .msstftd import DiscriminatorSTFT, MultiScaleSTFTDiscriminator  # noqa: F401
