"""Models: the ViT encoder/classifier (`vit`), the MAE around it (`mae`), the torch
state-dict table (`param_table`) and analytic FLOPs (`flops`)."""

from ssfer_jax.models.mae import MAE
from ssfer_jax.models.vit import encoder_params_from_mae, ViT, vit_kwargs, VIT_SIZES

__all__ = ["MAE", "VIT_SIZES", "ViT", "encoder_params_from_mae", "vit_kwargs"]
