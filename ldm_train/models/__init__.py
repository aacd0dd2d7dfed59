"""Pure nn.Modules of the LDM: the UNet, the text encoder (the autoencoders live in ``autoencoder.py``)."""
from ldm_train.models.text_encoder import BERTEmbedder
from ldm_train.models.unet import UNetModel

__all__ = ["BERTEmbedder", "UNetModel"]
