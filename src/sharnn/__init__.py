"""sharnn: the Single Headed Attention RNN (Merity 2019) — model, training, evaluation, generation, scoring."""

from .config import SHARNNConfig, TrainConfig
from .errors import SharnnError
from .model import SHARNNOutput
from .pretrained import SHARNN  # the network with generate / save_pretrained / from_pretrained
from .state import BlockState, State

__all__ = ["SHARNN", "BlockState", "SHARNNConfig", "SHARNNOutput", "SharnnError", "State", "TrainConfig"]
__version__ = "0.1.0"
