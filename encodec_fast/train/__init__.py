"""Training EnCodec models: the trainer (`Trainer`, `TrainConfig`, `train`; the command is
`encodec-fast train`), the multi-scale STFT discriminator, the losses, the loss balancer, the
training data pipeline and the validation metrics."""

from .balancer import Balancer  # noqa: F401
from .losses import (  # noqa: F401
                     MultiScaleMelLoss,
                     discriminator_hinge_loss,
                     generator_hinge_loss,
                     relative_feature_matching,
                     time_l1,
)
from .msstftd import DiscriminatorSTFT, MultiScaleSTFTDiscriminator  # noqa: F401
from .trainer import TrainConfig, Trainer, TrainingError, train  # noqa: F401
