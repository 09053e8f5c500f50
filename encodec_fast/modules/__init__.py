"""Torch modules used by EnCodec."""

from .conv import NormConv1d, NormConvTranspose1d, SConv1d, SConvTranspose1d, pad1d, unpad1d  # noqa: F401
from .lstm import SLSTM  # noqa: F401
from .seanet import SEANetDecoder, SEANetEncoder, SEANetResnetBlock  # noqa: F401
from .transformer import StreamingTransformerEncoder  # noqa: F401
