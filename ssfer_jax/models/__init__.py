"""Models: the ViT encoder/classifier (`vit`), the MAE around it (`mae`), the torch
state-dict table (`param_table`) and analytic FLOPs (`flops`)."""

from ssfer_jax.models.mae import MAE
from ssfer_jax.models.vit import VIT_SIZES, ViT, encoder_params_from_mae, vit_kwargs

__all__ = ["MAE", "VIT_SIZES", "ViT", "encoder_params_from_mae", "vit_kwargs"]
