"""encodec_fast: a fast, drop-in compatible EnCodec."""

__version__ = "0.1.0"

from .audio import convert_audio, read_audio, save_audio  # noqa: F401,E402
from .compress import compress, compress_to_file, decompress, decompress_from_file  # noqa: F401,E402
from .cpu import tune_cpu_allocator  # noqa: F401,E402
from .lm import LMModel  # noqa: F401,E402
from .model import EncodecModel, encodec_model_24khz, encodec_model_24khz_small, encodec_model_48khz  # noqa: F401,E402
from .pretrained import CheckpointError  # noqa: F401,E402
